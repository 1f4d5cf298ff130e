"""The single allocation point for every output buffer the kernels code fills in.

Kernels write outputs into uninitialised memory, so a missed element would silently hold
garbage. Routing all such allocations through :func:`empty` lets tests substitute a NaN-filled
buffer ("NaN poisoning") and see any element a kernel failed to write.

Large CPU outputs (the table gradient of a step: hundreds of MB) are fresh memory every step,
and first-touch page faults on 4 KiB pages cost more than the kernel that fills them (about
40 ms per 238 MB on a 2-core VM, where writing the same bytes takes 14 ms). Such buffers are
therefore advised to the kernel as transparent-huge-page candidates before their first touch
(where THP is unavailable the advice is a no-op), and kept in a small pool once freed: the next
step's buffer of about the same size reuses pages that are already mapped and touched, with no
fault at all. A pooled buffer is handed out again only when nothing else holds its storage.
"""

import ctypes
import math
import sys
import threading

import torch

_HUGE_PAGE = 2 << 20
# Below this, malloc serves allocations from memory the process already touched.
_HUGE_PAGE_MIN_BYTES = 32 << 20
_MADV_HUGEPAGE = 14  # Linux, every architecture

_madvise = None
# Freed large buffers kept for reuse, least recently used first, at most _POOL_SIZE of them; a
# buffer serves a request of at least half its size, so little of a reused buffer lies idle.
_POOL_SIZE = 8
_pool: list[torch.Tensor] = []
_pool_lock = threading.Lock()


def _get_madvise():
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _madvise = fn
            except (OSError, AttributeError):
                pass
    return _madvise


def _unused(raw: torch.Tensor) -> bool:
    """Nothing but the pool holds ``raw``'s storage: no view of it is alive. (The storage's use
    count is the pool's tensor plus the wrapper made to ask.)"""
    return torch._C._storage_Use_Count(raw.untyped_storage()._cdata) <= 2


def _empty_huge_pages(shape, dtype, nbytes):
    """An uninitialised CPU tensor: a free pooled buffer of about its size, else fresh memory,
    2 MiB aligned and advised MADV_HUGEPAGE before its first touch."""
    with _pool_lock:
        for i, raw in enumerate(_pool):
            if nbytes <= raw.numel() - _HUGE_PAGE <= 2 * nbytes and _unused(raw):
                _pool.append(_pool.pop(i))
                break
        else:
            raw = torch.empty(nbytes + _HUGE_PAGE, dtype=torch.uint8)
            aligned = raw[(-raw.data_ptr()) % _HUGE_PAGE :]
            length = aligned.numel() // _HUGE_PAGE * _HUGE_PAGE
            _get_madvise()(aligned.data_ptr(), length, _MADV_HUGEPAGE)  # advice only: failure changes nothing
            if len(_pool) >= _POOL_SIZE:  # drop the least recently used free buffer, if any
                free = next((j for j, old in enumerate(_pool) if _unused(old)), None)
                if free is not None:
                    _pool.pop(free)
            if len(_pool) < _POOL_SIZE:
                _pool.append(raw)
    start = (-raw.data_ptr()) % _HUGE_PAGE
    return raw[start : start + nbytes].view(dtype).view(shape)


def advise_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """Advises the 2 MiB-aligned interior of a large CPU tensor's memory as transparent-huge-page
    candidates and returns ``t``; call it before the memory is first touched.

    For value tables and their [N, D] optimizer state: a step reads and writes rows scattered
    over GBs, and with 4 KiB pages nearly every row costs a TLB miss (measured at 2^22 x 256
    fp32 on a 2-core VM: the forward 22 -> 18 ms, the lookup with the row update in its backward
    72 -> 61 ms). Advice only: where THP is unavailable nothing changes."""
    if t.device.type == "cpu" and t.numel() * t.element_size() >= _HUGE_PAGE_MIN_BYTES and _get_madvise():
        start = t.data_ptr()
        first = -(-start // _HUGE_PAGE) * _HUGE_PAGE
        last = (start + t.numel() * t.element_size()) // _HUGE_PAGE * _HUGE_PAGE
        if last > first:
            _get_madvise()(first, last - first, _MADV_HUGEPAGE)
    return t


def empty_huge_pages(*shape, dtype, device=None) -> torch.Tensor:
    """``torch.empty`` advised for huge pages (:func:`advise_huge_pages`): a long-lived table."""
    return advise_huge_pages(torch.empty(*shape, dtype=dtype, device=device))


def empty(*shape, dtype, device):
    """``torch.empty`` for output buffers; tests monkeypatch this to return NaN-filled tensors."""
    if torch.device(device).type == "cpu":
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes >= _HUGE_PAGE_MIN_BYTES and _get_madvise():
            return _empty_huge_pages(shape, dtype, nbytes)
    return torch.empty(*shape, dtype=dtype, device=device)
