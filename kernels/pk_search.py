"""The selection step of the product-key search (Lample et al. 2019).

A memory layer scores each half of a query against its ``n_keys`` sub-keys, keeps each half's
best ``k1 = min(knn, n_keys)`` keys and then the best ``knn`` of the ``k1**2`` sums: exactly the
best ``knn`` of all ``n_keys**2`` slots wherever sums of different half scores do not round to a
tie (with an infinite half score, or halves so far apart in magnitude that a sum drops the
smaller one's digits, a slot outside a half's best ``k1`` can tie with a selected one, and a
brute-force sort might place it first by slot order). :func:`pk_select` does that selection in one pass per
half (the C++ CPU kernels, ``cpu_bag.cpp``) instead of three ``torch.topk`` calls; it returns
only indices, so the caller gathers the selected scores from its own differentiable tensor.

Order: higher score first; ties go to the lower key index within a half and to the lower slot
index ``i * n_keys + j`` among sums: the order of :func:`pk_select_reference`, a brute-force
stable sort of all slots. A NaN score ranks as -inf: below every number, so it is chosen only
where a half has fewer than ``k1`` numbers.

:func:`pk_search` fuses the rest of the search around that selection: scoring (a tile of tokens
at a time) and a backward that touches only the selected sub-keys.
"""

import torch

from . import _alloc, cpu_ext


def _check_knn(knn: int, n_keys: int) -> None:
    if not 1 <= knn <= min(knn, n_keys) ** 2:
        raise ValueError(f"knn must be in [1, {min(knn, n_keys) ** 2}], got {knn}")


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
    _check_knn(knn, n_keys)
    first = _alloc.empty(rows, knn, dtype=torch.int64, device="cpu")
    second = _alloc.empty(rows, knn, dtype=torch.int64, device="cpu")
    ops.pk_select(half_scores.detach().contiguous().unsqueeze(1), knn, first, second, None)
    return first, second


# Bytes of half scores scored and selected at a time by pk_search: a tile that stays in the
# caches between the matmul that writes it and the selection that reads it.
TILE_BYTES = 2 << 20


def _use_triton(q: torch.Tensor, backend: str) -> bool:
    from .embedding_bag import _has_triton, require_triton

    if backend == "triton":
        require_triton(q)
        return True
    return backend == "auto" and q.is_cuda and _has_triton()


def pk_search(q: torch.Tensor, keys: torch.Tensor, knn: int, backend: str = "auto"):
    """The whole search, fused: query halves ``q`` [tokens, heads, 2, half] and sub-keys ``keys``
    [heads, 2, n_keys, half] -> (first, second, scores), each [tokens, heads, knn], best first:
    the selected slots are ``first * n_keys + second``, and ``scores`` (differentiable in ``q``
    and ``keys``) their summed half scores.

    The [tokens, heads, 2, n_keys] score tensor never exists, and the backward touches only the
    selected sub-keys (``knn`` per token, head and half instead of ``n_keys``). ``backend``:
    ``"cpp"`` (CPU fp32/fp64: half scores a tile of tokens at a time, the C++ selection and
    backward), ``"triton"`` (``kernels.triton_search``: CUDA, or CPU under
    ``TRITON_INTERPRET=1``; fp32/bf16/fp16 inputs, fp32 scores) or ``"auto"`` (the C++ kernels
    on the CPU, Triton on CUDA when installed). None where no kernel serves the inputs: the
    caller then uses torch."""
    tokens, heads, halves, half = q.shape
    if halves != 2 or keys.dim() != 4 or tuple(keys.shape[:2]) != (heads, 2) or keys.shape[3] != half:
        raise ValueError(
            f"q [tokens, heads, 2, half] and keys [heads, 2, n_keys, half] do not match: "
            f"{tuple(q.shape)}, {tuple(keys.shape)}"
        )
    if keys.dtype != q.dtype or keys.device != q.device:
        return None
    if _use_triton(q, backend):
        if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return None
        _check_knn(knn, keys.shape[2])
        from .triton_search import MAX_KNN, pk_search_triton

        if knn > MAX_KNN and backend != "triton":
            return None
        return pk_search_triton(q, keys, knn)
    if backend not in ("auto", "cpp") or q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64):
        return None
    ops = cpu_ext.load()
    if ops is None:
        return None
    _check_knn(knn, keys.shape[2])
    return _PKSearch.apply(q, keys, knn, ops)


class _PKSearch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, keys, knn, ops):
        q, keys = q.detach().contiguous(), keys.detach().contiguous()
        tokens, heads, _, half = q.shape
        n_keys = keys.shape[2]
        first = _alloc.empty(tokens, heads, knn, dtype=torch.int64, device="cpu")
        second = _alloc.empty(tokens, heads, knn, dtype=torch.int64, device="cpu")
        scores = _alloc.empty(tokens, heads, knn, dtype=q.dtype, device="cpu")
        step = max(1, TILE_BYTES // (heads * 2 * n_keys * q.element_size()))
        keys_t = keys.transpose(2, 3)  # [heads, 2, half, n_keys]
        q_t = q.permute(1, 2, 0, 3).contiguous()  # [heads, 2, tokens, half]: each tile a strided batch
        tile = None
        for t0 in range(0, tokens, step):
            t1 = min(tokens, t0 + step)
            if tile is None or tile.shape[2] != t1 - t0:
                tile = torch.empty(heads, 2, t1 - t0, n_keys, dtype=q.dtype)
            # [heads, 2, t, half] @ [heads, 2, half, n_keys], selected in place as [t, heads, 2, n_keys]
            torch.matmul(q_t[:, :, t0:t1], keys_t, out=tile)
            ops.pk_select(tile.permute(2, 0, 1, 3), knn, first[t0:t1], second[t0:t1], scores[t0:t1])
        ctx.save_for_backward(q, keys, first, second)
        ctx.mark_non_differentiable(first, second)
        ctx.ops = ops
        return first, second, scores

    @staticmethod
    def backward(ctx, _first, _second, grad):
        q, keys, first, second = ctx.saved_tensors
        want_q, want_keys = ctx.needs_input_grad[:2]
        dq = _alloc.empty(*q.shape, dtype=q.dtype, device="cpu") if want_q else None
        dkeys = _alloc.empty(*keys.shape, dtype=keys.dtype, device="cpu") if want_keys else None
        ctx.ops.pk_score_backward(q, keys, first, second, grad.contiguous(), dq, dkeys)
        return dq, dkeys, None, None


def pk_select_reference(half_scores: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force over all ``n_keys**2`` slots, in :func:`pk_select`'s order (slow; for tests)."""
    n_keys = half_scores.shape[-1]
    every = (half_scores[:, 0, :, None] + half_scores[:, 1, None, :]).flatten(1)
    order = torch.sort(every.nan_to_num(nan=-torch.inf), dim=-1, descending=True, stable=True).indices[:, :knn]
    return order // n_keys, order % n_keys
