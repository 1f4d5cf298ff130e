"""Distributed training pieces: process groups, sharded value tables, local spawning, planning."""

from .context import DistContext, ParallelDims, init_distributed, shutdown_distributed
from .plan import balanced_ranges, lookup_traffic
from .sharded import ShardedValueTable
from .spawn import WorkerError, spawn

__all__ = [
    "DistContext",
    "ParallelDims",
    "ShardedValueTable",
    "WorkerError",
    "balanced_ranges",
    "init_distributed",
    "lookup_traffic",
    "shutdown_distributed",
    "spawn",
]
