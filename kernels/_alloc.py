"""The single allocation point for every output buffer the kernels code fills in.

Kernels write outputs into uninitialised memory, so a missed element would silently hold
garbage. Routing all such allocations through :func:`empty` lets tests substitute a NaN-filled
buffer ("NaN poisoning") and see any element a kernel failed to write.

Large CPU outputs (the table gradient of a step: hundreds of MB) are fresh memory every step,
and first-touch page faults on 4 KiB pages cost more than the kernel that fills them (about
40 ms per 238 MB on a 2-core VM, where writing the same bytes takes 14 ms). Such buffers are
therefore advised to the kernel as transparent-huge-page candidates before their first touch;
where THP is unavailable the advice is a no-op.
"""

import ctypes
import math
import sys

import torch

_HUGE_PAGE = 2 << 20
# Below this, malloc serves allocations from memory the process already touched.
_HUGE_PAGE_MIN_BYTES = 32 << 20
_MADV_HUGEPAGE = 14  # Linux, every architecture

_madvise = None


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


def _empty_huge_pages(shape, dtype, nbytes):
    """An uninitialised CPU tensor whose pages are advised MADV_HUGEPAGE before first touch."""
    raw = torch.empty(nbytes + _HUGE_PAGE, dtype=torch.uint8)
    start = (-raw.data_ptr()) % _HUGE_PAGE
    length = (nbytes + _HUGE_PAGE - start) // _HUGE_PAGE * _HUGE_PAGE
    _get_madvise()(raw.data_ptr() + start, length, _MADV_HUGEPAGE)  # advice only: failure changes nothing
    return raw[start : start + nbytes].view(dtype).view(shape)


def empty(*shape, dtype, device):
    """``torch.empty`` for output buffers; tests monkeypatch this to return NaN-filled tensors."""
    if torch.device(device).type == "cpu":
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes >= _HUGE_PAGE_MIN_BYTES and _get_madvise():
            return _empty_huge_pages(shape, dtype, nbytes)
    return torch.empty(*shape, dtype=dtype, device=device)
