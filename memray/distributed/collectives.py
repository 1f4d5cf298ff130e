"""Every collective memray itself calls, named for what it moves.

DeepSpeed runs its own collectives on the dense parameters inside its engine; everything else
that crosses the network goes through these functions, so a reader sees in one file which
tensors move, in which group: lookups and partial bags of sharded value tables (``exchange``),
sums of losses, token counts and gradient norms (``sum_over``), per-rank counters and shard
sizes (``gather_from_ranks``, ``gather_rows``), checkpoint checksums (``gather_objects``) and
the barriers of a collective save.

``group=None`` is the default (whole-world) group. Where no process group exists (one process,
no ``torch.distributed``), each function is the single-rank identity, so callers need not ask.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def rank_in(group=None) -> int:
    """This process's rank in ``group`` (0 without a process group)."""
    return dist.get_rank(group) if dist.is_initialized() else 0


def sum_over(x: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of ``x`` over the ranks of ``group``, as a new tensor (``x`` is not changed)."""
    if _world(group) == 1:
        return x.clone()
    out = x.clone()
    dist.all_reduce(out, group=group)
    return out


def gather_from_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``x`` (same shape everywhere), stacked in rank order: [world, *x.shape]."""
    if _world(group) == 1:
        return x[None].clone()
    out = [torch.empty_like(x) for _ in range(_world(group))]
    dist.all_gather(out, x, group=group)
    return torch.stack(out)


def gather_rows(local: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``local`` concatenated along dim 0 in rank order (row counts may differ)."""
    if _world(group) == 1:
        return local.clone()
    sizes = [int(n) for n in gather_from_ranks(torch.tensor(local.shape[0]), group)]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: local.shape[0]] = local
    pieces = gather_from_ranks(padded, group)
    return torch.cat([p[:n] for p, n in zip(pieces, sizes)])


def exchange(send: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> torch.Tensor:
    """All-to-all along dim 0 with uneven splits: ``send_splits[r]`` rows of ``send`` go to rank
    r, ``recv_splits[r]`` rows come from it, in rank order."""
    send = send.contiguous()
    recv = send.new_empty((sum(recv_splits), *send.shape[1:]))
    dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
    return recv


def gather_objects(obj, group=None) -> list:
    """Every rank's picklable ``obj`` (small: checksums, error messages), in rank order."""
    if _world(group) == 1:
        return [obj]
    out = [None] * _world(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group=None) -> None:
    if _world(group) > 1:
        dist.barrier(group=group)
