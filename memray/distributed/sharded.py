"""A value pool sharded over the ranks of a memory-parallel group.

``ShardedValueTable`` implements the value-table protocol
(:class:`memray.model.ValueTableBase`) and computes the same bags as the unsharded
:class:`memray.model.ValueTable`; only where the rows live changes. Every rank passes the lookups of its
own tokens; the call is collective (all ranks of the group call it, in the same order, in
forward and in backward).

* **row layout**: rank r owns a contiguous, balanced row range. Forward buckets the
  (row, weight) entries by owner, sorted by (owner, token), and sends each owner its entries
  (12 bytes each: int32 local row, int32 bag number, fp32 weight) with one ``all_to_all_single``
  of uneven splits. Each owner sums its rows into one partial bag per (source token) with the
  embedding-bag kernels; the partial bags return by all-to-all and are added per token.
  Backward sends each partial bag's gradient to its owner, which computes the gradient of its
  own rows (row-sparse) and of the weights, and returns the weight gradients.
* **column layout** (the paper's): rank r owns a slice of the value dimension for every row.
  Indices and weights are gathered from all ranks (12 bytes per entry per rank), each rank bags
  its slice for every token and returns each rank's token rows of it; backward returns the
  output-gradient slices and sums the per-slice weight gradients.

No collective of the table or of its gradient ever happens: each rank keeps and updates its
shard alone. Traffic counters (``stats``) count bytes that leave or reach this rank, which
``memray.distributed.plan.lookup_traffic`` predicts.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from memray.kernels import bag_backward, bag_forward
from memray.model.values import TableShard, ValueTableBase

from . import collectives
from .plan import balanced_ranges


def _exchange(
    send: torch.Tensor, send_splits: list[int], recv_splits: list[int], table: ShardedValueTable
) -> torch.Tensor:
    """:func:`collectives.exchange` in the table's group, counting off-rank bytes."""
    recv = collectives.exchange(send, send_splits, recv_splits, table.group)
    row_bytes = math.prod(send.shape[1:]) * send.element_size()  # also where this rank sends no row
    me = table.rank
    table.stats.bytes_sent += (sum(send_splits) - send_splits[me]) * row_bytes
    table.stats.bytes_received += (sum(recv_splits) - recv_splits[me]) * row_bytes
    return recv


def _wire_dtype(weights: torch.Tensor) -> torch.dtype:
    """Weights travel as fp32 (fp64 for an fp64 layer, as in reference checks)."""
    return torch.promote_types(weights.dtype, torch.float32)


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


class _RowLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, shard, indices, table, record):
        W = table.world
        T, L = indices.shape
        device = indices.device
        owner = torch.bucketize(indices.reshape(-1), table.row_starts[1:], right=True)
        token = torch.arange(T, device=device).repeat_interleave(L)
        key, order = torch.sort(owner * T + token, stable=True)
        new_bag = torch.ones_like(key, dtype=torch.bool)
        new_bag[1:] = key[1:] != key[:-1]
        bag_keys = key[new_bag]  # one (owner, token) pair per partial bag, sorted
        bag_owner, bag_token = bag_keys // max(T, 1), bag_keys % max(T, 1)
        entries_out = torch.bincount(owner, minlength=W)
        bags_out = torch.bincount(bag_owner, minlength=W)
        owner_sorted = owner[order]
        bag_local = torch.cumsum(new_bag, 0) - 1 - _exclusive_cumsum(bags_out)[owner_sorted]
        # one int32 message per entry: local row, bag number, the weight's bits (1 or 2 words)
        wdtype = _wire_dtype(weights)
        payload = torch.cat(
            [
                (indices.reshape(-1)[order] - table.row_starts[owner_sorted]).to(torch.int32)[:, None],
                bag_local.to(torch.int32)[:, None],
                weights.reshape(-1)[order]
                .to(wdtype)
                .contiguous()
                .view(torch.int32)
                .view(owner.numel(), wdtype.itemsize // 4),
            ],
            dim=1,
        )
        counts_in = _exchange(torch.stack([entries_out, bags_out], 1), [1] * W, [1] * W, table)
        entries_out, bags_out = entries_out.tolist(), bags_out.tolist()
        entries_in, bags_in = counts_in[:, 0].tolist(), counts_in[:, 1].tolist()
        received = _exchange(payload, entries_out, entries_in, table)
        rows = received[:, 0].long()
        w = received[:, 2:].contiguous().view(wdtype).reshape(-1)
        # bag numbers are per source; entries arrive grouped by source, then by bag (CSR order)
        source = torch.repeat_interleave(torch.arange(W, device=device), torch.tensor(entries_in, device=device))
        bag = received[:, 1].long() + _exclusive_cumsum(torch.tensor(bags_in, device=device))[source]
        num_bags_in = sum(bags_in)
        offsets = torch.zeros(num_bags_in + 1, dtype=torch.int64, device=device)
        torch.cumsum(torch.bincount(bag, minlength=num_bags_in), 0, out=offsets[1:])
        table.stats.rows_served += rows.numel()
        table.record_owned(rows, w, usage=record)
        partial = bag_forward(rows, w, shard, offsets, table.backend)  # [bags_in, D]
        returned = _exchange(partial, bags_in, bags_out, table)  # [bags_out, D], bag_keys order
        out = torch.zeros(T, shard.shape[1], dtype=partial.dtype, device=device).index_add_(0, bag_token, returned)
        ctx.save_for_backward(shard, rows, w, offsets, order, bag_token)
        ctx.splits = (entries_out, entries_in, bags_out, bags_in)
        ctx.table, ctx.weights_shape, ctx.weights_dtype = table, weights.shape, weights.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        shard, rows, w, offsets, order, bag_token = ctx.saved_tensors
        entries_out, entries_in, bags_out, bags_in = ctx.splits
        table = ctx.table
        need_w, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_bags = _exchange(grad_out.index_select(0, bag_token).to(w.dtype), bags_out, bags_in, table)
        grad_w_in, unique_rows, row_grads = bag_backward(
            grad_bags, rows, w, shard, offsets, table.backend, need_weights_grad=need_w, need_table_grad=need_t
        )
        grad_weights = None
        if need_w:
            grad_sorted = _exchange(grad_w_in.to(w.dtype), entries_in, entries_out, table)
            grad_weights = torch.empty_like(grad_sorted).index_copy_(0, order, grad_sorted)
            grad_weights = grad_weights.view(ctx.weights_shape).to(ctx.weights_dtype)
        return grad_weights, table.shard_grad(unique_rows, row_grads) if need_t else None, None, None, None


class _ColumnLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, shard, indices, table, record):
        W = table.world
        T, L = indices.shape
        device = indices.device
        tokens_in = _exchange(torch.full((W,), T, dtype=torch.int64, device=device), [1] * W, [1] * W, table).tolist()
        entries_in = [t * L for t in tokens_in]
        all_rows = _exchange(indices.reshape(-1).repeat(W), [T * L] * W, entries_in, table)
        all_w = _exchange(weights.reshape(-1).to(_wire_dtype(weights)).repeat(W), [T * L] * W, entries_in, table)
        offsets = torch.arange(0, sum(entries_in) + 1, L, dtype=torch.int64, device=device)
        table.stats.rows_served += all_rows.numel()
        table.record_owned(all_rows, all_w, usage=record)
        partial = bag_forward(all_rows, all_w, shard, offsets, table.backend)  # [sum T_s, D_r]
        widths = table.col_widths
        pieces = _exchange(partial.reshape(-1), [t * shard.shape[1] for t in tokens_in], [T * d for d in widths], table)
        out = torch.cat([p.view(T, d) for p, d in zip(pieces.split([T * d for d in widths]), widths)], dim=1)
        ctx.save_for_backward(shard, all_rows, all_w, offsets)
        ctx.tokens = (T, L, tokens_in)
        ctx.table, ctx.weights_shape, ctx.weights_dtype = table, weights.shape, weights.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        shard, all_rows, all_w, offsets = ctx.saved_tensors
        T, L, tokens_in = ctx.tokens
        table = ctx.table
        W, widths = table.world, table.col_widths
        need_w, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        slices = torch.cat([s.reshape(-1) for s in grad_out.to(all_w.dtype).split(widths, dim=1)])
        grad_partial = _exchange(slices, [T * d for d in widths], [t * shard.shape[1] for t in tokens_in], table)
        grad_w_all, unique_rows, row_grads = bag_backward(
            grad_partial.view(-1, shard.shape[1]),
            all_rows,
            all_w,
            shard,
            offsets,
            table.backend,
            need_weights_grad=need_w,
            need_table_grad=need_t,
        )
        grad_weights = None
        if need_w:
            parts = _exchange(grad_w_all.to(all_w.dtype), [t * L for t in tokens_in], [T * L] * W, table)
            grad_weights = parts.view(W, T * L).sum(0).view(ctx.weights_shape).to(ctx.weights_dtype)
        return grad_weights, table.shard_grad(unique_rows, row_grads) if need_t else None, None, None, None


class ShardedValueTable(ValueTableBase):
    """A ``num_rows x dim`` value pool of which this rank holds ``weight`` (its shard).

    ``weight`` is [rows of ``row_range``, columns of ``col_range``]; usage buffers cover the rows
    this rank looks up: its own rows (row layout) or every row (column layout, where every
    rank sees every lookup). The initial table equals the unsharded :class:`ValueTable` drawn
    from the same seed (``init_seed``; by default one draw from torch's global generator, as an
    unsharded table makes).
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        *,
        group: dist.ProcessGroup | None = None,
        layout: str = "row",
        device=None,
        **options,
    ):
        if layout not in ("row", "column"):
            raise ValueError(f"layout must be 'row' or 'column', got {layout!r}")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if layout == "row":
            ranges = balanced_ranges(num_rows, world)
            shard = TableShard(num_rows, dim, layout, rank, world, row_range=ranges[rank])
            starts = [start for start, _ in ranges]
        else:
            ranges = balanced_ranges(dim, world)
            shard = TableShard(
                num_rows,
                dim,
                layout,
                rank,
                world,
                col_range=ranges[rank],
                col_widths=tuple(stop - start for start, stop in ranges),
            )
            starts = [0]
        super().__init__(shard, device=device, **options)
        self.group = group
        self.register_buffer("row_starts", torch.tensor(starts, dtype=torch.int64, device=device), persistent=False)

    @classmethod
    def from_config(cls, memory, model_dim: int, **options) -> ShardedValueTable:
        """As :meth:`ValueTableBase.from_config`, sharded in the config's layout."""
        return super().from_config(memory, model_dim, layout=memory.layout, **options)

    def forward(self, indices: torch.Tensor, weights: torch.Tensor, *, record: bool = False) -> torch.Tensor:
        """``indices``/``weights`` [tokens, lookups] of this rank's tokens -> bags [tokens, dim]."""
        fn = _RowLookup if self.layout == "row" else _ColumnLookup
        return fn.apply(weights, self.weight, indices, self, bool(record))

    def shard_grad(self, unique_rows: torch.Tensor, row_grads: torch.Tensor) -> torch.Tensor:
        if self.sparse_grad:
            return torch.sparse_coo_tensor(
                unique_rows[None], row_grads, self.weight.shape, is_coalesced=True, check_invariants=False
            )
        return torch.zeros_like(self.weight).index_copy_(0, unique_rows, row_grads)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return collectives.sum_over(x, self.group)

    @torch.no_grad()
    def gather_row_values(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "column" or self.world == 1:  # every rank holds (and reads) every row
            return super().gather_row_values(x)
        return collectives.gather_rows(x, self.group)

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        if self.world == 1:
            return super().full_weight()
        if self.layout == "row":
            return collectives.gather_rows(self.weight.detach(), self.group)
        return collectives.gather_rows(self.weight.detach().t(), self.group).t().contiguous()
