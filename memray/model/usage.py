"""Memory-usage metrics of a value pool (Lample et al. 2019, "Large Memory Layers with Product Keys").

All metrics take per-slot statistics accumulated over some window of lookups: access counts and
the softmax weight mass each slot received.
"""

from __future__ import annotations

import math

import torch


def usage_metrics(counts: torch.Tensor, mass: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Metrics of one pool from per-slot access ``counts`` and weight ``mass`` (both [num_slots]).

    * ``used``: fraction of slots accessed at least once.
    * ``kl_uniform``: KL divergence (nats) of the weight-mass distribution from uniform; 0 when
      every slot carries the same mass, log(num_slots) when a single slot carries all of it.
    * ``gini``: Gini coefficient of the weight mass (0 = equal, towards 1 = concentrated).
    * ``top50`` / ``top90`` / ``top99``: the smallest fraction of slots that together hold 50 %,
      90 %, 99 % of the weight mass.
    """
    return touched_usage_metrics(mass[counts > 0], counts.numel(), prefix)


def touched_usage_metrics(mass: torch.Tensor, num_slots: int, prefix: str = "") -> dict[str, float]:
    """:func:`usage_metrics` from the slots that were read alone: ``mass`` [m] holds the weight
    mass of each slot read at least once (in any order), the other ``num_slots - m`` slots hold
    none. Costs O(m log m), whatever the pool's size."""
    mass = mass.double().clamp_min(0)
    total = float(mass.sum())
    out = {"used": mass.numel() / num_slots if num_slots else 0.0}
    if total <= 0.0:
        out.update(kl_uniform=0.0, gini=0.0, top50=0.0, top90=0.0, top99=0.0)
    else:
        p = mass[mass > 0] / total
        out["kl_uniform"] = float((p * p.log()).sum()) + math.log(num_slots)
        ascending = torch.sort(p).values
        # Gini from the Lorenz curve of the shares sorted ascending: the num_slots - m' empty
        # slots come first and add nothing, the m' others sit at ranks num_slots - m' + 1 ...
        ranks = torch.arange(num_slots - p.numel() + 1, num_slots + 1, dtype=torch.float64, device=p.device)
        out["gini"] = float(((2 * ranks - num_slots - 1) * ascending).sum() / num_slots)
        cumulative = torch.cumsum(ascending.flip(0), 0)
        for level, name in ((0.5, "top50"), (0.9, "top90"), (0.99, "top99")):
            threshold = torch.tensor(level * (1 - 1e-12), dtype=torch.float64, device=cumulative.device)
            needed = int(torch.searchsorted(cumulative, threshold)) + 1
            out[name] = min(needed, num_slots) / num_slots
    return {f"{prefix}{k}": v for k, v in out.items()}


class UsageWindow:
    """The lookups of one value table since the last :meth:`take`, kept in proportion to the rows
    read, never to the table: rows and weights are appended as lookups happen and folded into
    one entry per distinct row whenever ``fold_every`` entries are pending. A table calls
    :meth:`add` through its ``usage_observers``."""

    def __init__(self, fold_every: int = 1 << 22):
        self.fold_every = fold_every
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._entries = 0

    @torch.no_grad()
    def add(self, rows: torch.Tensor, weights: torch.Tensor) -> None:
        """Lookups of ``rows`` (this process's part of the table) with softmax ``weights``."""
        self._pending.append((rows.reshape(-1), weights.reshape(-1).double()))
        self._entries += rows.numel()
        if self._entries > self.fold_every:
            self._pending = [self._fold()]
            self._entries = self._pending[0][0].numel()

    def _fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.cat([r for r, _ in self._pending])
        weights = torch.cat([w for _, w in self._pending])
        unique, inverse = torch.unique(rows, return_inverse=True)
        return unique, torch.zeros(unique.numel(), dtype=torch.float64, device=rows.device).index_add_(
            0, inverse, weights
        )

    @torch.no_grad()
    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(distinct rows read [m] int64, each one's weight mass [m] fp64) since the last take; a
        new window starts."""
        if not self._pending:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64)
        out = self._fold()
        self._pending, self._entries = [], 0
        return out
