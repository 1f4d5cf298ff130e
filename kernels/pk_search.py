"""The selection step of the product-key search (Lample et al. 2019).

A memory layer scores each half of a query against its ``n_keys`` sub-keys, keeps each half's
best ``k1 = min(knn, n_keys)`` keys and then the best ``knn`` of the ``k1**2`` sums: exactly the
best ``knn`` of all ``n_keys**2`` slots. :func:`pk_select` does that selection in one pass per
half (the C++ CPU kernels, ``cpu_bag.cpp``) instead of three ``torch.topk`` calls; it returns
only indices, so the caller gathers the selected scores from its own differentiable tensor.

Order: higher score first; ties go to the lower key index within a half and to the lower slot
index ``i * n_keys + j`` among sums: the order of :func:`pk_select_reference`, a brute-force
stable sort of all slots. NaN scores are never selected.
"""

import torch

from . import _alloc, cpu_ext


def pk_select(half_scores: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``half_scores`` [rows, 2, n_keys] fp32/fp64 on the CPU -> (i, j) [rows, knn] int64: the
    selected slots ``i * n_keys + j``, best first. None where the C++ kernels are unavailable (or
    the tensor is not on the CPU): the caller then uses torch."""
    if half_scores.device.type != "cpu" or half_scores.dtype not in (torch.float32, torch.float64):
        return None
    ops = cpu_ext.load()
    if ops is None:
        return None
    rows, halves, n_keys = half_scores.shape
    if halves != 2:
        raise ValueError(f"half_scores must be [rows, 2, n_keys], got {tuple(half_scores.shape)}")
    if not 1 <= knn <= min(knn, n_keys) ** 2:
        raise ValueError(f"knn must be in [1, {min(knn, n_keys) ** 2}], got {knn}")
    first = _alloc.empty(rows, knn, dtype=torch.int64, device="cpu")
    second = _alloc.empty(rows, knn, dtype=torch.int64, device="cpu")
    ops.pk_select(half_scores.detach().contiguous(), knn, first, second)
    return first, second


def pk_select_reference(half_scores: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force over all ``n_keys**2`` slots, in :func:`pk_select`'s order (slow; for tests)."""
    n_keys = half_scores.shape[-1]
    every = (half_scores[:, 0, :, None] + half_scores[:, 1, None, :]).flatten(1)
    order = torch.sort(every.nan_to_num(nan=-torch.inf), dim=-1, descending=True, stable=True).indices[:, :knn]
    return order // n_keys, order % n_keys
