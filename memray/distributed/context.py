"""Process groups and the parallel layout of a run.

``ParallelDims`` is checked before any process starts, so a bad world size is a one-line config
error rather than a hang. ``init_distributed`` joins (or reuses) the default process group from
the usual environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``: set by
:mod:`memray.distributed.spawn`, torchrun or Ray Train) and creates the memory-parallel group,
a group of its own so that value-table traffic never interleaves with DeepSpeed's collectives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from memray.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    """World size and memory-parallel size; every rank is also a data-parallel rank."""

    world_size: int
    memory_parallel_size: int | None = None  # None: the whole world

    def __post_init__(self):
        if self.world_size < 1:
            raise ConfigError("distributed.workers", f"must be >= 1, got {self.world_size}")
        mp = self.memory_parallel_size
        if mp is not None and mp != self.world_size:
            # Smaller groups would replicate each table across groups and need their row
            # gradients summed across replicas every step; memray keeps one group for now.
            raise ConfigError(
                "model.memory.parallel_size",
                f"{mp} does not match the world size {self.world_size}: the memory-parallel group is the "
                "whole world (leave it unset, or set it to the number of workers)",
            )

    @property
    def memory_size(self) -> int:
        return self.memory_parallel_size or self.world_size

    def check_table(self, num_rows: int, dim: int, layout: str) -> None:
        """A table of ``num_rows x dim`` must give every rank of the memory group a shard."""
        w = self.memory_size
        if layout == "row" and num_rows < w:
            raise ConfigError(
                "model.memory.n_keys", f"{num_rows} value rows cannot be split over {w} ranks (row layout)"
            )
        if layout == "column" and dim < w:
            raise ConfigError("model.memory.v_dim", f"value dim {dim} cannot be split over {w} ranks (column layout)")


@dataclass
class DistContext:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    memory_group: dist.ProcessGroup | None


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_distributed(backend: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Join the default process group (or reuse an initialised one) and build the memory group."""
    if not dist.is_initialized():
        backend = default_backend() if backend == "auto" else backend
        dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    backend = dist.get_backend()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    group = dist.new_group(list(range(world)), backend=backend)
    return DistContext(rank, world, local_rank, device, backend, group)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
