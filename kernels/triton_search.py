"""The product-key search as one Triton kernel: scoring, each half's top-k and the top-knn of
the sums, without the [tokens, heads, 2, n_keys] score tensor.

One program takes ``BLOCK_T`` tokens of one head. For each half it scores a block of
``BLOCK_N`` sub-keys at a time (``tl.dot``, fp32 accumulation, IEEE precision: no TF32), keeps
the best ``k1`` keys seen so far; then, for one first-half key at a time, it merges that key's
``k1`` sums into the best ``knn`` so far (never holding all ``k1 * k1`` sums: at knn 64 they
would need more shared memory than a GPU has). ``knn`` up to ``MAX_KNN``. Every ranking is a
``tl.topk`` over int64 keys that pack the fp32 score (order preserving, high 32 bits) above
the complement of the key or slot index (low 32 bits), so sorting them descending orders by
score and breaks ties towards the lower index: the order of
:func:`memray.kernels.pk_select_reference`, the brute-force search over all ``n_keys**2`` slots.
NaN scores rank as -inf, as there.

The backward (:class:`_TritonSearch`) touches only the selected sub-keys: per head and half,
``dq = G @ keys`` and ``dkeys = G^T @ q`` with ``G`` the [tokens, n_keys] sparse matrix of the
selected scores' gradients (``knn`` entries per token).

Imported only when the Triton search runs (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1`` for tests). ``launches()`` lists what :mod:`memray.kernels.aot` compiles
ahead of time for the GPU targets (registers and spills per launch: benchmarks/README.md).
"""

import torch
import triton
import triton.language as tl

_MIN_INT64 = tl.constexpr(-(2**63))  # a global read inside @triton.jit code must be a constexpr


@triton.jit
def _pack(score, index):
    """int64 keys ordered as (score descending, index ascending) under a descending sort."""
    # NaN ranks as -inf. (No -0.0 arrives here, which would rank below +0.0: half scores are
    # accumulated onto +0.0, and a sum of two of them is -0.0 only if both are.)
    score = tl.where(score != score, float("-inf"), score)
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed order of the floats
    low = tl.full(index.shape, 4294967295, tl.int64) - index.to(tl.int64)  # 2**32 - 1 - index
    return (ordered.to(tl.int64) << 32) | low


@triton.jit
def _unpack(packed):
    """(fp32 score, int64 index) of :func:`_pack`'s keys."""
    high = packed >> 32
    ordered = high.to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    low = packed - (high << 32)
    return bits.to(tl.float32, bitcast=True), tl.full(low.shape, 4294967295, tl.int64) - low


@triton.jit
def _merge_top(best, block, K: tl.constexpr, BLOCK_T: tl.constexpr):
    """The K largest of two [BLOCK_T, K] key sets, best first."""
    both = tl.reshape(tl.join(best, block), (BLOCK_T, 2 * K))
    return tl.topk(both, K, dim=1)


@triton.jit
def _column(x, col, K: tl.constexpr):
    """Column ``col`` (a runtime number) of the int64 [BLOCK_T, K] tensor ``x``: [BLOCK_T]."""
    return tl.sum(tl.where(tl.arange(0, K)[None, :] == col, x, 0), axis=1)


@triton.jit
def _half_top(
    q_ptr,
    k_ptr,
    rows,
    row_ok,
    n_keys,
    stride_qt,
    stride_kn,
    HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K: tl.constexpr,
):
    """Packed top-K keys [BLOCK_T, K] of one half, best first (padding: the minimum)."""
    best = tl.full((BLOCK_T, K), _MIN_INT64, tl.int64)
    for n0 in range(0, n_keys, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_keys
        acc = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
        for d0 in range(0, HALF, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_ok = dims < HALF
            q = tl.load(
                q_ptr + rows[:, None].to(tl.int64) * stride_qt + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            k = tl.load(
                k_ptr + cols[None, :].to(tl.int64) * stride_kn + dims[:, None],
                mask=col_ok[None, :] & dim_ok[:, None],
                other=0.0,
            ).to(tl.float32)
            acc += tl.dot(q, k, input_precision="ieee")
        packed = tl.where(col_ok[None, :], _pack(acc, cols[None, :]), _MIN_INT64)
        if BLOCK_N > K:
            packed = tl.topk(packed, K, dim=1)
        best = _merge_top(best, packed, K, BLOCK_T)
    return best


@triton.jit
def _pk_search_kernel(
    q_ptr,
    k_ptr,
    first_ptr,
    second_ptr,
    score_ptr,
    tokens,
    n_keys,
    k1,
    knn,
    stride_qt,
    stride_qh,
    stride_qs,
    stride_kh,
    stride_ks,
    stride_kn,
    stride_ot,
    stride_oh,
    HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K: tl.constexpr,
):
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < tokens
    q_head = q_ptr + head.to(tl.int64) * stride_qh
    k_head = k_ptr + head.to(tl.int64) * stride_kh
    top0 = _half_top(q_head, k_head, rows, row_ok, n_keys, stride_qt, stride_kn, HALF, BLOCK_T, BLOCK_N, BLOCK_D, K)
    top1 = _half_top(
        q_head + stride_qs,
        k_head + stride_ks,
        rows,
        row_ok,
        n_keys,
        stride_qt,
        stride_kn,
        HALF,
        BLOCK_T,
        BLOCK_N,
        BLOCK_D,
        K,
    )
    s1, i1 = _unpack(top1)
    key_ok = tl.arange(0, K) < k1  # each half's best k1 keys (k1 <= n_keys: all real keys)
    # The best knn of the k1 * k1 sums, one key of the first half at a time: its k1 sums
    # merged into the best K so far. (All k1 * k1 sums at once would hold a [BLOCK_T, K * K]
    # tensor: 128 KiB of shared memory at knn 32, more than a GPU has at knn 64.)
    best = tl.full((BLOCK_T, K), _MIN_INT64, tl.int64)
    for a in range(0, k1):
        s0, i0 = _unpack(_column(top0, a, K))  # [BLOCK_T]: the first half's a-th best key
        sums = tl.where(key_ok[None, :], _pack(s0[:, None] + s1, i0[:, None] * n_keys + i1), _MIN_INT64)
        best = _merge_top(best, sums, K, BLOCK_T)
    score, slot = _unpack(best)
    cols = tl.arange(0, K)
    out = rows[:, None].to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh + cols[None, :]
    mask = row_ok[:, None] & (cols[None, :] < knn)
    tl.store(first_ptr + out, slot // n_keys, mask=mask)
    tl.store(second_ptr + out, slot % n_keys, mask=mask)
    tl.store(score_ptr + out, score, mask=mask)


def _pow2(n: int, low: int = 1) -> int:
    return max(low, triton.next_power_of_2(n))


#: the largest knn the kernel serves (larger ones: the caller's torch search); the AOT compile
#: test (tests/test_aot.py) holds its shared memory under every target's limit
MAX_KNN = 64
NUM_WARPS = 8  # the [BLOCK_T, BLOCK_N] rankings over 8 warps: 4 warps spill at knn 32 (sm_90)


def search_constexprs(half: int, n_keys: int, knn: int) -> dict:
    """The kernel's compile-time parameters for one search shape: what :func:`search` launches
    with and what :func:`compile_variants` compiles."""
    return {
        "HALF": half,
        "BLOCK_T": 16,  # tl.dot needs 16 rows at least
        # 64 keys scored and ranked at a time: at 128, ptxas spills (sm_90, knn 32: 255 registers
        # and 3.6 KB of spill stores; at 64 with 8 warps: 198 registers, none)
        "BLOCK_N": max(_pow2(min(n_keys, 64), 16), _pow2(knn, 2)),
        "BLOCK_D": min(_pow2(half, 16), 64),
        "K": _pow2(knn, 2),  # each half's best k1 = min(knn, n_keys) keys and the best knn sums
    }


def search(q: torch.Tensor, keys: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Selection only (no autograd): ``q`` [tokens, heads, 2, half], ``keys`` [heads, 2, n_keys,
    half] -> (first, second, scores) [tokens, heads, knn], best first; scores fp32."""
    q, keys = q.contiguous(), keys.contiguous()
    tokens, heads, _, half = q.shape
    n_keys = keys.shape[2]
    if n_keys**2 > 2**32:
        raise ValueError(f"n_keys**2 = {n_keys**2} slots: the Triton search packs slot numbers in 32 bits")
    if knn > MAX_KNN:
        raise ValueError(f"knn = {knn}: the Triton search serves knn <= {MAX_KNN}")
    first = torch.empty(tokens, heads, knn, dtype=torch.int64, device=q.device)
    second = torch.empty_like(first)
    scores = torch.empty(tokens, heads, knn, dtype=torch.float32, device=q.device)
    constexprs = search_constexprs(half, n_keys, knn)
    grid = (triton.cdiv(tokens, constexprs["BLOCK_T"]), heads)
    if tokens:
        _pk_search_kernel[grid](
            q,
            keys,
            first,
            second,
            scores,
            tokens,
            n_keys,
            min(knn, n_keys),
            knn,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            keys.stride(0),
            keys.stride(1),
            keys.stride(2),
            first.stride(0),
            first.stride(1),
            **constexprs,
            num_warps=NUM_WARPS,
        )
    return first, second, scores


#: (knn, n_keys, half) of the searches compiled ahead of time: together they take every branch
#: of search_constexprs (a ranking per block of keys or none; dims masked, ragged or whole blocks;
#: the smallest and largest K) at the paper's shape and at the small ones of tests and demos
SEARCH_SHAPES = ((1, 8, 8), (16, 16, 40), (32, 1024, 256), (MAX_KNN, 4096, 512))
SEARCH_DTYPES = (torch.float32, torch.bfloat16)  # query and sub-key dtypes (scores are fp32)


def launches() -> list:
    """Every compilation of the search kernel that :func:`search` can launch for
    ``SEARCH_SHAPES`` x ``SEARCH_DTYPES`` (:class:`memray.kernels.aot.Launch`)."""
    from .aot import Launch

    out = []
    for dtype in SEARCH_DTYPES:
        pointers = dict(q_ptr=dtype, k_ptr=dtype, score_ptr=torch.float32)
        pointers.update(first_ptr=torch.int64, second_ptr=torch.int64)
        for knn, n_keys, half in SEARCH_SHAPES:
            constexprs = search_constexprs(half, n_keys, knn)
            where = f"search: {dtype}, knn {knn}, n_keys {n_keys}, half {half}"
            out.append(Launch(_pk_search_kernel, pointers, constexprs, where, num_warps=NUM_WARPS))
    return out


def _selected_matrix(index: torch.Tensor, grad: torch.Tensor, n_keys: int) -> torch.Tensor:
    """[tokens, n_keys] sparse matrix with ``grad[t, k]`` at ``(t, index[t, k])`` (summed where a
    token selected one key in several slots)."""
    tokens, knn = index.shape
    rows = torch.arange(tokens, device=index.device).repeat_interleave(knn)
    entries = torch.stack([rows, index.reshape(-1)])
    return torch.sparse_coo_tensor(entries, grad.reshape(-1), (tokens, n_keys), check_invariants=False).coalesce()


class _TritonSearch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, keys, knn):
        first, second, scores = search(q.detach(), keys.detach(), knn)
        ctx.save_for_backward(q, keys, first, second)
        ctx.mark_non_differentiable(first, second)
        return first, second, scores

    @staticmethod
    def backward(ctx, _first, _second, grad):
        q, keys, first, second = ctx.saved_tensors
        want_q, want_keys = ctx.needs_input_grad[:2]
        n_keys = keys.shape[2]
        qf, kf, grad = q.float(), keys.float(), grad.float()
        dq = torch.zeros_like(qf) if want_q else None
        dkeys = torch.zeros_like(kf) if want_keys else None
        for h in range(q.shape[1]):
            for s, index in enumerate((first, second)):
                g = _selected_matrix(index[:, h], grad[:, h], n_keys)  # [tokens, n_keys]
                if want_q:
                    dq[:, h, s] = torch.sparse.mm(g, kf[h, s])
                if want_keys:
                    dkeys[h, s] = torch.sparse.mm(g.t(), qf[:, h, s])
        return (
            dq.to(q.dtype) if want_q else None,
            dkeys.to(keys.dtype) if want_keys else None,
            None,
        )


def pk_search_triton(q: torch.Tensor, keys: torch.Tensor, knn: int):
    """:func:`memray.kernels.pk_search` on the Triton kernel: (first, second, scores), scores
    differentiable in ``q`` and ``keys`` (fp32)."""
    return _TritonSearch.apply(q, keys, knn)
