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
    num_slots = counts.numel()
    mass = mass.double().clamp_min(0)
    total = float(mass.sum())
    out = {"used": float((counts > 0).sum()) / num_slots if num_slots else 0.0}
    if total <= 0.0:
        out.update(kl_uniform=0.0, gini=0.0, top50=0.0, top90=0.0, top99=0.0)
    else:
        p = mass / total
        nz = p[p > 0]
        out["kl_uniform"] = float((nz * nz.log()).sum()) + math.log(num_slots)
        ascending = torch.sort(p).values
        ranks = torch.arange(1, num_slots + 1, dtype=torch.float64, device=ascending.device)
        # Gini from the Lorenz curve of the sorted shares.
        out["gini"] = float(((2 * ranks - num_slots - 1) * ascending).sum() / num_slots)
        cumulative = torch.cumsum(ascending.flip(0), 0)
        for level, name in ((0.5, "top50"), (0.9, "top90"), (0.99, "top99")):
            threshold = torch.tensor(level * (1 - 1e-12), dtype=torch.float64, device=cumulative.device)
            needed = int(torch.searchsorted(cumulative, threshold)) + 1
            out[name] = min(needed, num_slots) / num_slots
    return {f"{prefix}{k}": v for k, v in out.items()}
