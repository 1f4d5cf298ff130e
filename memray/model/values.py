"""Value tables: the protocol every value pool implements, and the unsharded table.

A value pool is a ``num_rows x dim`` table read as weighted bags of rows. :class:`ValueTableBase`
is the one interface that memory layers, the trainer, the optimizers and the checkpointer rely
on; :class:`ValueTable` (here: the whole table on one process) and
:class:`memray.distributed.ShardedValueTable` (a row range or a column slice per rank) implement
it, so callers never ask which kind they hold.

What every table holds and offers:

* ``shard`` (:class:`TableShard`): the whole table's shape and the rows and columns this
  process holds; ``weight`` is exactly that part.
* ``forward(indices, weights, record=...)`` -> bags ``[tokens, dim]`` of this process's tokens
  (collective for a sharded table), ``usage_count``/``usage_mass`` over ``shard.row_range``
  (cumulative, saved with the weights), ``stats`` (:class:`LookupStats`).
* reductions over the processes holding the other parts: ``all_reduce``, ``gather_row_values``,
  ``full_weight`` (no-ops or copies when unsharded).
* ``from_config``: the one way a pool is built from a :class:`MemoryConfig`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from memray.kernels import embedding_bag, empty_huge_pages

INIT_BLOCK_ROWS = 1 << 16


@dataclass(frozen=True)
class TableShard:
    """The part of a ``num_rows x dim`` table one process holds.

    ``layout``: ``unsharded`` (everything), ``row`` (a contiguous row range, all columns) or
    ``column`` (every row, a slice of the value dim); ``col_widths``: each rank's columns.
    """

    num_rows: int
    dim: int
    layout: str = "unsharded"
    rank: int = 0
    world: int = 1
    row_range: tuple[int, int] | None = None
    col_range: tuple[int, int] | None = None
    col_widths: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.row_range is None:
            object.__setattr__(self, "row_range", (0, self.num_rows))
        if self.col_range is None:
            object.__setattr__(self, "col_range", (0, self.dim))
        if self.col_widths is None:
            object.__setattr__(self, "col_widths", (self.dim,) * self.world)

    @property
    def rows(self) -> int:
        return self.row_range[1] - self.row_range[0]

    @property
    def cols(self) -> int:
        return self.col_range[1] - self.col_range[0]


@dataclass
class LookupStats:
    """Counters since the last ``reset``: entries this process looked up in its part of the
    table, and bytes it sent to / received from other ranks (forward and backward)."""

    rows_served: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def reset(self) -> LookupStats:
        out = LookupStats(self.rows_served, self.bytes_sent, self.bytes_received)
        self.rows_served = self.bytes_sent = self.bytes_received = 0
        return out


class ValueTableBase(nn.Module, ABC):
    """The value-table protocol (see the module docstring), with what all tables share:
    the parameter of this process's part, usage buffers, the seeded initialisation."""

    def __init__(
        self,
        shard: TableShard,
        *,
        init_std: float | None = None,
        init_seed: int | None = None,
        sparse_grad: bool = True,
        backend: str = "auto",
        lr: float | None = None,
        weight_decay: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.shard = shard
        self.num_rows, self.dim = shard.num_rows, shard.dim
        self.init_std = shard.dim**-0.5 if init_std is None else init_std
        # drawn once from torch's global generator: re-initialising gives the same table, and a
        # sharded pool drawn after the same calls starts exactly as an unsharded one
        self.init_seed = draw_init_seed() if init_seed is None else init_seed
        self.sparse_grad, self.backend, self.lr, self.weight_decay = sparse_grad, backend, lr, weight_decay
        self.weight = nn.Parameter(
            empty_huge_pages(shard.rows, shard.cols, device=device, dtype=dtype or torch.get_default_dtype())
        )
        # cumulative since the table was created, over the rows of row_range; saved with the weights
        self.register_buffer("usage_count", torch.empty(shard.rows, dtype=torch.int64, device=device))
        self.register_buffer("usage_mass", torch.empty(shard.rows, dtype=torch.float32, device=device))
        self.stats = LookupStats()
        # a list while a step's lookups are being collected (sparse-memory finetuning): each
        # lookup appends the rows of this process's part it read (relative to row_range)
        self.step_rows: list[torch.Tensor] | None = None
        # called with (rows, weights) of each lookup recorded in the usage statistics, rows of
        # this process's part (relative to row_range): e.g. a metrics window (memray.model.UsageWindow)
        self.usage_observers: list = []
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # the usage mass sums millions of weights below 1: it stays fp32 when the module is cast
        # (module.to(torch.bfloat16), .half()); in bf16 such a sum stops growing near 256x a weight
        if self.usage_mass.is_floating_point() and self.usage_mass.dtype != torch.float32:
            self.usage_mass = self.usage_mass.float()
        return self

    @classmethod
    def from_config(cls, memory, model_dim: int, **options) -> ValueTableBase:
        """A pool for memory layers of ``memory`` (a :class:`MemoryConfig`) in a model of
        ``model_dim``: ``n_keys**2`` rows of ``v_dim`` (default ``model_dim``), with the
        config's initialisation, storage dtype, kernel backend, learning rate and weight decay. ``options``:
        what the table class takes besides (device, sparse_grad, a process group ...)."""
        return cls(
            memory.num_slots,
            memory.v_dim or model_dim,
            init_std=memory.value_init_std,
            backend=memory.backend,
            lr=memory.value_lr,
            weight_decay=memory.value_weight_decay,
            dtype=memory.value_torch_dtype,
            **options,
        )

    # the shard's fields, read often enough to name directly
    @property
    def layout(self) -> str:
        return self.shard.layout

    @property
    def rank(self) -> int:
        return self.shard.rank

    @property
    def world(self) -> int:
        return self.shard.world

    @property
    def row_range(self) -> tuple[int, int]:
        return self.shard.row_range

    @property
    def col_range(self) -> tuple[int, int]:
        return self.shard.col_range

    @property
    def col_widths(self) -> tuple[int, ...]:
        return self.shard.col_widths

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        with torch.no_grad():
            s = self.shard
            init_value_rows(
                self.weight, self.init_seed, self.init_std, (s.num_rows, s.dim), s.row_range[0], s.col_range[0]
            )
            self.usage_count.zero_()
            self.usage_mass.zero_()

    @abstractmethod
    def forward(self, indices: torch.Tensor, weights: torch.Tensor, *, record: bool = False) -> torch.Tensor:
        """``indices``/``weights`` [tokens, lookups] of this process's tokens -> bags [tokens, dim]
        (fp32 accumulation). ``record``: add the lookups to the usage statistics."""

    @torch.no_grad()
    def record_owned(self, rows: torch.Tensor, weights: torch.Tensor, usage: bool = True) -> None:
        """Lookups of rows of this process's part (indices relative to ``row_range``): added to
        the usage statistics (``usage``), and to ``step_rows`` while that collects a step's.
        Every lookup calls it; it does nothing when neither is asked for."""
        if self.step_rows is not None:
            self.step_rows.append(rows)
        if usage:
            self.usage_count.index_add_(0, rows, torch.ones_like(rows))
            self.usage_mass.index_add_(0, rows, weights.to(self.usage_mass.dtype))
            for observe in self.usage_observers:
                observe(rows, weights)

    # -- reductions over the processes holding the other parts ------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the processes holding parts of this table (e.g. squared gradient
        norms of the parts); ``x`` itself when one process holds it all."""
        return x

    def gather_row_values(self, x: torch.Tensor) -> torch.Tensor:
        """Values ``x`` [n] for some rows of this process's part, concatenated with the other
        processes' values for theirs, on every process (collective where processes hold different
        rows; ``x`` itself where one holds every row). For figures over the rows read, whose size
        is that of the reads, not of the table."""
        return x

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The whole table on every process (collective when sharded; for tests, small tables)."""
        return self.weight.detach().clone()

    def extra_repr(self) -> str:
        s = self.shard
        return (
            f"num_rows={s.num_rows}, dim={s.dim}, layout={s.layout}, rank={s.rank}/{s.world}, "
            f"rows={s.row_range}, cols={s.col_range}, sparse_grad={self.sparse_grad}"
        )


class ValueTable(ValueTableBase):
    """The whole value pool on one process: ``weight`` [num_rows, dim].

    The gradient of ``weight`` is row-sparse (a sparse COO tensor holding only the rows read)
    when ``sparse_grad``; autograd accumulation may leave it uncoalesced.
    """

    def __init__(self, num_rows: int, dim: int, **options):
        super().__init__(TableShard(num_rows, dim), **options)
        # a value optimizer's rule that the lookup's backward applies to the rows it read, in
        # place of their gradient (RowSparseOptimizer.update_in_backward); None: a gradient
        self.row_update = None

    def forward(self, indices: torch.Tensor, weights: torch.Tensor, *, record: bool = False) -> torch.Tensor:
        self.stats.rows_served += indices.numel()
        self.record_owned(indices.reshape(-1), weights.detach().reshape(-1), usage=record)
        return embedding_bag(
            indices,
            weights,
            self.weight,
            sparse_grad=self.sparse_grad,
            backend=self.backend,
            row_update=self.row_update,
        )


@torch.no_grad()
def init_value_rows(
    out: torch.Tensor,
    seed: int,
    std: float,
    shape: tuple[int, int] | None = None,
    row_start: int = 0,
    col_start: int = 0,
) -> None:
    """Fill ``out`` with its part (rows from ``row_start``, columns from ``col_start``) of a
    ``shape`` table (default: ``out``'s) drawn from N(0, std).

    The table is drawn in blocks of ``INIT_BLOCK_ROWS`` rows, block ``b`` whole (torch's normal
    sampler depends on the tensor size) from a generator seeded with ``seed + b``, so a shard (a
    row range, a column slice) is generated alone and equals the same part of the whole table:
    a sharded pool starts exactly as an unsharded one. Values are drawn in fp32 (then rounded to
    ``out``'s dtype) on ``out``'s device: a 10^10-value table is drawn in seconds on a GPU, and the
    same seed gives the same table on any number of devices of one type (CPU and CUDA generators
    differ from each other).
    """
    num_rows, dim = out.shape if shape is None else shape
    rows, cols = out.shape
    if rows == 0:
        return
    generator = torch.Generator(device=out.device)
    for block in range(row_start // INIT_BLOCK_ROWS, (row_start + rows - 1) // INIT_BLOCK_ROWS + 1):
        first = block * INIT_BLOCK_ROWS
        lo, hi = max(first, row_start), min(first + INIT_BLOCK_ROWS, row_start + rows)
        generator.manual_seed(seed + block)
        values = torch.empty(min(INIT_BLOCK_ROWS, num_rows - first), dim, device=out.device)
        values.normal_(0.0, std, generator=generator)
        out[lo - row_start : hi - row_start].copy_(values[lo - first : hi - first, col_start : col_start + cols])


def draw_init_seed() -> int:
    """One draw from torch's global generator: the seed of a value table's initialisation."""
    return int(torch.randint(0, 2**62, (), device="cpu").item())
