"""What a run logs: one record per logged step, over the window since the previous one.

A record holds the step's own figures (loss, gradient norms, learning rates), the throughput of
the window, and per value pool its usage metrics (``memory/<pool>/...``: slots read, KL to
uniform, Gini, top-k mass) and its lookup load per rank (``lookup/<pool>/...``: rows served,
bytes sent and received per step, imbalance). Collecting them is collective on N ranks: every
rank calls :meth:`MetricsProcessor.record` at the same steps.
"""

from __future__ import annotations

import time

import torch

from memray.distributed import collectives
from memray.model import UsageWindow, touched_usage_metrics


class MetricsProcessor:
    def __init__(self, tables: dict):
        """``tables``: pool name -> value table (:class:`memray.model.ValueTableBase`). A usage
        window per table watches its recorded lookups (``usage_observers``)."""
        self.tables = tables
        self._windows = {name: UsageWindow() for name in tables}
        for name, table in tables.items():
            table.usage_observers.append(self._windows[name].add)
        self.reset_window()

    def reset_window(self) -> None:
        """Start the throughput window here (e.g. when training starts)."""
        self._start, self._tokens, self._steps = time.perf_counter(), 0, 0

    def reset_usage(self) -> None:
        """Start the usage window here (e.g. after usage counts were restored)."""
        for window in self._windows.values():
            window.take()

    def count(self, tokens: int) -> float:
        """A step of ``tokens`` tokens is done; returns the window's tokens per second so far."""
        self._tokens += tokens
        self._steps += 1
        return self._tokens / max(time.perf_counter() - self._start, 1e-9)

    def record(self, step_metrics: dict) -> dict:
        """The record of this step (collective), and a new window from here."""
        tokens_per_s = self._tokens / max(time.perf_counter() - self._start, 1e-9)
        out = {**step_metrics, "tokens_per_s": tokens_per_s, **self._usage_window(), **self._lookup_window()}
        self.reset_window()
        return out

    def _usage_window(self) -> dict[str, float]:
        """Usage metrics of each pool over the lookups since the previous record, from the rows
        read alone: each rank's distinct rows and their weight mass, gathered where ranks hold
        different rows. Costs O(rows read) per record, whatever the pool's size."""
        out = {}
        for name, table in self.tables.items():
            _, mass = self._windows[name].take()
            mass = table.gather_row_values(mass.to(table.usage_mass.device))
            out.update(touched_usage_metrics(mass, table.num_rows, prefix=f"memory/{name}/"))
        return out

    def _lookup_window(self) -> dict:
        """Per-rank lookup load since the previous record: rows served and bytes per step."""
        out = {}
        for name, table in self.tables.items():
            s = table.stats.reset()
            mine = torch.tensor([s.rows_served, s.bytes_sent, s.bytes_received], dtype=torch.float64)
            per_rank = collectives.gather_from_ranks(mine) / max(self._steps, 1)
            served = per_rank[:, 0]
            out[f"lookup/{name}/rows_served"] = served.tolist()
            out[f"lookup/{name}/bytes_sent"] = per_rank[:, 1].tolist()
            out[f"lookup/{name}/bytes_received"] = per_rank[:, 2].tolist()
            out[f"lookup/{name}/imbalance"] = float(served.max() / served.mean()) if served.sum() > 0 else 1.0
        return out
