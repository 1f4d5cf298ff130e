"""Every collective memray itself calls, named for what it moves.

DeepSpeed runs its own collectives on the dense parameters inside its engine; everything else
that crosses the network goes through these functions, so a reader sees in one file which
tensors move, in which group: lookups and partial bags of sharded value tables (``exchange``),
sums of losses, token counts and gradient norms (``sum_over``), per-rank counters and shard
sizes (``gather_from_ranks``, ``gather_rows``), checkpoint checksums (``gather_objects``) and
the barriers of a collective save.

**The device rule.** A collective's tensors must be where the group's backend can reach them:
NCCL takes only CUDA tensors, gloo CPU ones. Every function here moves its tensors to
:func:`comm_device` (the current CUDA device under NCCL, the CPU otherwise) and returns its
result on the caller's device, so callers may pass a CPU counter under NCCL or a device tensor
under gloo. The other way, one process group per device type (``cpu:gloo,cuda:nccl``), would
need memray to create every group itself, while Ray Train and torchrun create the default one,
and DeepSpeed checks the default group's backend by name; and the hot path gains nothing from
it: lookups, partial bags and their gradients already live on the device, so moving them is a
no-op, and what does move is a few bytes per logged step (token counts, lookup counters, shard
sizes). ``tests/test_collectives.py`` runs the distributed paths with every collective checked
against this rule.

``group=None`` is the default (whole-world) group. Where no process group exists (one process,
no ``torch.distributed``), each function is the single-rank identity, so callers need not ask.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.distributed as dist

# Tensors handed to a collective in the current audit (tests), by id: see :func:`audit`.
_audited: dict[int, weakref.ref] | None = None


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def rank_in(group=None) -> int:
    """This process's rank in ``group`` (0 without a process group)."""
    return dist.get_rank(group) if dist.is_initialized() else 0


def comm_device(group=None) -> torch.device:
    """Where ``group``'s collectives need their tensors: the current CUDA device under NCCL, else
    the CPU (gloo)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on(device: torch.device, t: torch.Tensor) -> torch.Tensor:
    """``t`` on ``device`` (itself when it is there already), as a collective may take it."""
    out = t.to(device)
    if _audited is not None:
        _audited[id(out)] = weakref.ref(out)
    return out


@contextlib.contextmanager
def audit():
    """While active, every tensor this module hands to ``torch.distributed`` is recorded, so a
    test can check each collective's tensors came through the device rule (:func:`audited`)."""
    global _audited
    previous, _audited = _audited, {}
    try:
        yield
    finally:
        _audited = previous


def audited(t: torch.Tensor) -> bool:
    """Whether ``t`` went through the device rule during the current :func:`audit`."""
    ref = _audited.get(id(t)) if _audited is not None else None
    return ref is not None and ref() is t


def sum_over(x: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of ``x`` over the ranks of ``group``, as a new tensor (``x`` is not changed)."""
    if _world(group) == 1:
        return x.clone()
    out = _on(comm_device(group), x.clone())
    dist.all_reduce(out, group=group)
    return out.to(x.device)


def gather_from_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``x`` (same shape everywhere), stacked in rank order: [world, *x.shape]."""
    if _world(group) == 1:
        return x[None].clone()
    device = comm_device(group)
    mine = _on(device, x)
    out = [_on(device, torch.empty_like(mine)) for _ in range(_world(group))]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out).to(x.device)


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
    r, ``recv_splits[r]`` rows come from it, in rank order. The result is on ``send``'s device."""
    device = comm_device(group)
    outgoing = _on(device, send.contiguous())
    recv = _on(device, outgoing.new_empty((sum(recv_splits), *send.shape[1:])))
    dist.all_to_all_single(recv, outgoing, recv_splits, send_splits, group=group)
    return recv.to(send.device)


def gather_objects(obj, group=None) -> list:
    """Every rank's picklable ``obj`` (small: checksums, error messages), in rank order. Under
    NCCL torch moves the pickled bytes through the current CUDA device itself."""
    if _world(group) == 1:
        return [obj]
    out = [None] * _world(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group=None) -> None:
    if _world(group) > 1:
        dist.barrier(group=group)
