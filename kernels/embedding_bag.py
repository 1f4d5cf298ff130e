"""Weighted embedding bag with a row-sparse table gradient, on three backends.

``embedding_bag`` is the autograd entry point used by memory layers; ``bag_forward`` and
``bag_backward`` are the autograd-free pieces in CSR form. Backends:

* ``"torch"``: stock torch ops, any device; the fallback everywhere.
* ``"cpp"``: the C++/OpenMP kernels of ``cpu_bag.cpp`` for CPU tensors, compiled on first use
  (``cpu_ext``); several times faster than ``"torch"`` (benchmarks/bench_lookup.py).
* ``"triton"``: the kernels in ``triton_bag`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).

``"auto"`` picks triton for CUDA tables when triton is installed, and on CPU the C++ kernels
when they build, else torch. Triton is imported only when that backend is used.
"""

import importlib.util
import os

import torch
import torch.nn.functional as F

from . import _alloc, cpu_ext
from .row_update import FUSED_RULES

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_BACKENDS = ("auto", "torch", "cpp", "triton")

# The torch backend materialises [chunk, D] fp32 temporaries; bounding them keeps memory flat
# for large batches (about 64 MiB per temporary).
_CHUNK_ELEMS = 1 << 24

_triton_available = None


def _has_triton():
    global _triton_available
    if _triton_available is None:
        _triton_available = importlib.util.find_spec("triton") is not None
    return _triton_available


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")


def _acc_dtype(*dtypes):
    # Accumulate in at least fp32; fp64 only when some input is fp64.
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _chunks(nnz, D):
    step = max(1, _CHUNK_ELEMS // max(D, 1))
    for start in range(0, nnz, step):
        yield slice(start, min(start + step, nnz))


def _cast_into_output(x, dtype):
    """Return ``x`` as ``dtype``, writing any conversion into an ``_alloc`` buffer."""
    if x.dtype == dtype:
        return x
    out = _alloc.empty(*x.shape, dtype=dtype, device=x.device)
    out.copy_(x)
    return out


def _normalize(indices, weights, table, offsets):
    """Validate inputs and return ``(indices [nnz], weights [nnz], offsets [B + 1])``.

    Only cheap checks: offsets values are inspected on CPU, where that costs no device sync.
    """
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise ValueError(f"table must be a 2-D [N, D] tensor, got shape {tuple(getattr(table, 'shape', ()))}")
    if table.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"table dtype must be one of {_FLOAT_DTYPES}, got {table.dtype}")
    if indices.dtype != torch.int64:
        raise ValueError(f"indices must be int64, got {indices.dtype}")
    if weights.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weights dtype must be one of {_FLOAT_DTYPES}, got {weights.dtype}")
    if weights.shape != indices.shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} must equal indices shape {tuple(indices.shape)}")
    if not (indices.device == weights.device == table.device):
        raise ValueError(
            f"indices, weights and table must share a device, got {indices.device}, {weights.device}, {table.device}"
        )

    if offsets is None:
        if indices.dim() != 2:
            raise ValueError(f"without offsets, indices must be [B, L]; got shape {tuple(indices.shape)}")
        num_bags, bag_len = indices.shape
        offsets = torch.arange(num_bags + 1, device=indices.device, dtype=torch.int64) * bag_len
        return indices.reshape(-1), weights.reshape(-1), offsets

    if indices.dim() != 1:
        raise ValueError(f"with offsets, indices must be flat [nnz]; got shape {tuple(indices.shape)}")
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets must be a 1-D int64 tensor [B + 1], got {offsets.dtype} {tuple(offsets.shape)}")
    if offsets.device != indices.device:
        raise ValueError(f"offsets on {offsets.device} but indices on {indices.device}")
    if offsets.device.type == "cpu":
        nnz = indices.numel()
        if offsets[0].item() != 0 or offsets[-1].item() != nnz:
            raise ValueError(
                f"offsets must start at 0 and end at nnz={nnz}, got {offsets[0].item()} .. {offsets[-1].item()}"
            )
        if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("offsets must be non-decreasing")
    return indices, weights, offsets


def _resolve_backend(backend, table):
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if table.is_cuda:
            return "triton" if _has_triton() else "torch"
        if table.device.type == "cpu" and cpu_ext.available():
            return "cpp"
        return "torch"
    if backend == "cpp":
        if table.device.type != "cpu":
            raise ValueError(f"backend='cpp' needs CPU tensors, got {table.device}")
        if not cpu_ext.available():
            raise ValueError(f"backend='cpp' requested but the C++ CPU kernels are unavailable: {cpu_ext.load_error}")
    if backend == "triton":
        require_triton(table)
    return backend


def require_triton(tensor) -> None:
    """Raises ValueError unless a Triton kernel can run on ``tensor``'s device."""
    if not _has_triton():
        raise ValueError("backend='triton' requested but triton is not installed")
    if not tensor.is_cuda and not _interpreting():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU)")


def _bag_ids(offsets, nnz):
    """Bag number of each entry; ``output_size`` avoids a device sync."""
    num_bags = offsets.numel() - 1
    lengths = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(num_bags, device=offsets.device), lengths, output_size=nnz)


def _row_major(x):
    # Kernels index rows by stride(0) and assume unit stride along D.
    return x if x.stride(-1) == 1 else x.contiguous()


def _row_segments(indices):
    """Entries grouped by table row: ``(order [nnz], unique_rows [U], seg [U + 1])``.

    ``indices[order]`` is sorted (stably, so each row's entries keep their order and results
    are deterministic); the entries of ``unique_rows[u]`` are ``order[seg[u]:seg[u + 1]]``.
    """
    sorted_rows, order = torch.sort(indices, stable=True)
    unique_rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    seg = torch.zeros(unique_rows.numel() + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, 0, out=seg[1:])
    return order, unique_rows, seg


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def _forward_torch(indices, weights, table, offsets):
    out_dtype = torch.result_type(table, weights)
    acc = _acc_dtype(out_dtype)
    num_bags, D = offsets.numel() - 1, table.shape[1]
    if table.dtype == acc:
        # Stock fused kernel; exact dtype match means it accumulates in `acc` already.
        return F.embedding_bag(
            indices, table, offsets, mode="sum", per_sample_weights=weights.to(acc), include_last_offset=True
        )
    # bf16 tables (or fp32 tables with fp64 weights): upcast gathered rows, never the table.
    out = torch.zeros(num_bags, D, dtype=acc, device=table.device)
    bag_ids = _bag_ids(offsets, indices.numel())
    for s in _chunks(indices.numel(), D):
        rows = table[indices[s]].to(acc)  # [chunk, D]
        rows.mul_(weights[s].to(acc)[:, None])
        out.index_add_(0, bag_ids[s], rows)
    return _cast_into_output(out, out_dtype)


def _forward_triton(indices, weights, table, offsets):
    from . import triton_bag

    out_dtype = torch.result_type(table, weights)
    num_bags, D = offsets.numel() - 1, table.shape[1]
    out = _alloc.empty(num_bags, D, dtype=out_dtype, device=table.device)
    triton_bag.bag_sum(
        indices.contiguous(),
        weights.contiguous(),
        _row_major(table),
        offsets.contiguous(),
        out,
        _acc_dtype(table.dtype, weights.dtype),
    )
    return out


def _forward_cpp(indices, weights, table, offsets):
    out_dtype = torch.result_type(table, weights)
    acc = _acc_dtype(table.dtype, weights.dtype)
    if table.dtype == acc:
        # F.embedding_bag's kernel (register-blocked, prefetching) beats ours on a table already
        # in the accumulation dtype (benchmarks/bench_lookup.py, "forward kernel" rows).
        return _forward_torch(indices, weights, table, offsets)
    ops = cpu_ext.load()
    num_bags, D = offsets.numel() - 1, table.shape[1]
    out = _alloc.empty(num_bags, D, dtype=acc, device=table.device)
    ops.bag_forward(indices.contiguous(), weights.to(acc).contiguous(), _row_major(table), offsets.contiguous(), out)
    return _cast_into_output(out, out_dtype)


def _forward(indices, weights, table, offsets, backend):
    if backend == "triton":
        return _forward_triton(indices, weights, table, offsets)
    if backend == "cpp":
        return _forward_cpp(indices, weights, table, offsets)
    return _forward_torch(indices, weights, table, offsets)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


def _backward_torch(grad_out, indices, weights, table, offsets, need_w, need_t):
    nnz, D = indices.numel(), table.shape[1]
    acc = _acc_dtype(table.dtype, weights.dtype, grad_out.dtype)
    bag_ids = _bag_ids(offsets, nnz)
    grad_out = _row_major(grad_out.to(acc))  # [B, D], small: converted once, never per entry

    grad_weights = unique_rows = row_grads = None
    if need_w:
        grad_weights = _alloc.empty(nnz, dtype=weights.dtype, device=weights.device)
        if table.dtype == acc:
            # torch's own fused per-entry dot (the backward of F.embedding_bag's weights):
            # no [nnz, D] temporaries.
            grad_weights.copy_(
                torch.ops.aten._embedding_bag_per_sample_weights_backward(
                    grad_out, table, indices.contiguous(), offsets[:-1], bag_ids, 0, -1
                )
            )
        else:
            for s in _chunks(nnz, D):
                grad_weights[s] = torch.linalg.vecdot(table[indices[s]].to(acc), grad_out[bag_ids[s]])
    if need_t:
        # dT[row] = sum over the row's entries of w[e] * grad_out[bag(e)]: once entries are
        # grouped by row this is itself a weighted bag sum, over grad_out rows.
        order, unique_rows, seg = _row_segments(indices)
        acc_rows = F.embedding_bag(
            bag_ids[order],
            grad_out,
            seg,
            mode="sum",
            per_sample_weights=weights[order].to(acc),
            include_last_offset=True,
        )
        row_grads = _cast_into_output(acc_rows, table.dtype)
    return grad_weights, unique_rows, row_grads


def _backward_cpp(grad_out, indices, weights, table, offsets, need_w, need_t, rule=None):
    """With ``rule`` (``(name, arguments)`` of a fused row update, see
    ``BackwardRowUpdate.fused_rule``) the touched rows of ``table`` are updated in place and the
    third value returned is each row's squared gradient norm [U] instead of the row gradients."""
    ops = cpu_ext.load()
    nnz, D = indices.numel(), table.shape[1]
    acc = _acc_dtype(table.dtype, weights.dtype, grad_out.dtype)
    if not (need_w or need_t):
        return None, None, None
    bag_ids = _bag_ids(offsets, nnz)
    order, unique_rows, seg = _row_segments(indices)
    grad_weights = _alloc.empty(nnz, dtype=acc, device=weights.device) if need_w else None
    grad_out, weights_acc = _row_major(grad_out.to(acc)), weights.to(acc).contiguous()
    if rule is None:
        row_grads = _alloc.empty(unique_rows.numel(), D, dtype=table.dtype, device=table.device) if need_t else None
        csr = (order, seg, unique_rows, grad_weights, row_grads)
        ops.bag_backward(grad_out, bag_ids, weights_acc, _row_major(table), *csr)
    else:
        name, args = rule
        if name not in FUSED_RULES:
            raise ValueError(f"no fused backward for rule {name!r}; one of {FUSED_RULES}")
        # the table itself, never a copy: the op updates it in place (and checks its layout)
        row_grads = torch.empty(unique_rows.numel(), dtype=torch.float32, device=table.device)
        getattr(ops, f"bag_backward_{name}")(
            grad_out, bag_ids, weights_acc, table, order, seg, unique_rows, grad_weights, row_grads, **args
        )
    if need_w:
        grad_weights = _cast_into_output(grad_weights, weights.dtype)
    return grad_weights, (unique_rows if need_t else None), row_grads


def _backward_triton(grad_out, indices, weights, table, offsets, need_w, need_t):
    from . import triton_bag

    nnz, D = indices.numel(), table.shape[1]
    acc = _acc_dtype(table.dtype, weights.dtype, grad_out.dtype)
    indices, weights, grad_out = indices.contiguous(), weights.contiguous(), _row_major(grad_out)
    bag_ids = _bag_ids(offsets, nnz)

    grad_weights = None
    if need_w:
        grad_weights = _alloc.empty(nnz, dtype=weights.dtype, device=weights.device)
        triton_bag.bag_dot(grad_out, indices, bag_ids, _row_major(table), grad_weights, acc)

    unique_rows = row_grads = None
    if need_t:
        # Stable sort groups each table row's entries into one contiguous segment; the table
        # gradient is then a bag sum over grad_out rows, one program per (unique row, D block).
        order, unique_rows, seg_offsets = _row_segments(indices)
        row_grads = _alloc.empty(unique_rows.numel(), D, dtype=table.dtype, device=table.device)
        triton_bag.bag_sum(bag_ids[order], weights[order], grad_out, seg_offsets, row_grads, acc)
    return grad_weights, unique_rows, row_grads


def _backward(grad_out, indices, weights, table, offsets, backend, need_w, need_t):
    fn = {"torch": _backward_torch, "cpp": _backward_cpp, "triton": _backward_triton}[backend]
    return fn(grad_out, indices, weights, table, offsets, need_w, need_t)


@torch.no_grad()
def _backward_update(grad_out, indices, weights, table, offsets, backend, need_w, update):
    """The backward with ``update`` (a ``BackwardRowUpdate``) applied to the touched rows of
    ``table`` in place; returns the weights' gradient (or ``None``)."""
    acc = _acc_dtype(table.dtype, weights.dtype, grad_out.dtype)
    fused = update.fused_rule(table) if backend == "cpp" else None
    if fused is not None and acc == torch.float32 and table.dtype in (torch.float32, torch.bfloat16):
        grad_weights, _, row_sq = _backward_cpp(grad_out, indices, weights, table, offsets, need_w, True, rule=fused)
        update.record(row_sq)
        return grad_weights
    grad_weights, rows, row_grads = _backward(grad_out, indices, weights, table, offsets, backend, need_w, True)
    row_grads = row_grads.float()
    update.record(torch.linalg.vecdot(row_grads, row_grads))
    update.apply(table, rows, row_grads)
    return grad_weights


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def bag_forward(indices, weights, table, offsets, backend="auto"):
    """``out[b] = sum_e weights[e] * table[indices[e]]`` without autograd.

    CSR form: ``indices``/``weights`` flat ``[nnz]`` with ``offsets`` ``[B + 1]`` (``[B, L]``
    with ``offsets=None`` is accepted too). Returns ``[B, D]`` in
    ``torch.result_type(table, weights)``.
    """
    indices, weights, offsets = _normalize(indices, weights, table, offsets)
    return _forward(indices, weights, table, offsets, _resolve_backend(backend, table))


def bag_backward(
    grad_out, indices, weights, table, offsets, backend="auto", *, need_weights_grad=True, need_table_grad=True
):
    """Gradients of :func:`bag_forward`, without autograd.

    Returns ``(grad_weights [nnz], unique_rows [U], row_grads [U, D])``: ``unique_rows`` are the
    sorted distinct rows of ``indices`` and ``row_grads`` their summed gradients in the table's
    dtype. Parts not requested are ``None``.
    """
    indices, weights, offsets = _normalize(indices, weights, table, offsets)
    num_bags, D = offsets.numel() - 1, table.shape[1]
    if grad_out.shape != (num_bags, D):
        raise ValueError(f"grad_out must be [{num_bags}, {D}], got {tuple(grad_out.shape)}")
    if grad_out.dtype not in _FLOAT_DTYPES or grad_out.device != table.device:
        raise ValueError(
            f"grad_out must be a float tensor on {table.device}, got {grad_out.dtype} on {grad_out.device}"
        )
    backend = _resolve_backend(backend, table)
    return _backward(grad_out, indices, weights, table, offsets, backend, need_weights_grad, need_table_grad)


class _EmbeddingBagFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, table, indices, offsets, sparse_grad, backend, row_update):
        ctx.save_for_backward(indices, weights, table, offsets)
        ctx.sparse_grad = sparse_grad
        ctx.backend = backend
        ctx.row_update = row_update
        return _forward(indices, weights, table, offsets, backend)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        indices, weights, table, offsets = ctx.saved_tensors
        need_w, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_t and ctx.row_update is not None:
            grad_weights = _backward_update(
                grad_out, indices, weights, table, offsets, ctx.backend, need_w, ctx.row_update
            )
            # the rows changed in place: a later backward that saved this table fails loudly
            # instead of reading updated rows as the ones its forward used
            torch.autograd.graph.increment_version(table)
            return grad_weights, None, None, None, None, None, None
        grad_weights, unique_rows, row_grads = _backward(
            grad_out, indices, weights, table, offsets, ctx.backend, need_w, need_t
        )
        grad_table = None
        if need_t:
            if ctx.sparse_grad:
                grad_table = torch.sparse_coo_tensor(
                    unique_rows[None], row_grads, table.shape, is_coalesced=True, check_invariants=False
                )
            else:
                grad_table = torch.zeros_like(table).index_copy_(0, unique_rows, row_grads)
        return grad_weights, grad_table, None, None, None, None, None


def embedding_bag(indices, weights, table, offsets=None, *, sparse_grad=True, backend="auto", row_update=None):
    """Weighted sum of table rows per bag, differentiable w.r.t. ``weights`` and ``table``.

    ``indices`` (int64) and ``weights`` are ``[B, L]``, or flat ``[nnz]`` with CSR ``offsets``
    ``[B + 1]`` (bags may be empty). Returns ``[B, D]`` in ``torch.result_type(table, weights)``,
    accumulated in at least fp32. With ``sparse_grad`` the table gradient is a coalesced sparse
    COO tensor over the touched rows only, so a huge table never gets a dense gradient.
    ``backend``: ``"torch"``, ``"cpp"`` (CPU), ``"triton"`` or ``"auto"`` (triton for CUDA tables
    when installed; on CPU the C++ kernels when they build, else torch).

    ``row_update`` (a :class:`memray.kernels.row_update.BackwardRowUpdate`): the backward
    applies that optimizer rule to the rows it touched, in place, instead of returning the
    table's gradient (fused into the backward's single visit of each row on the C++ backend).
    The table must then be read by no other lookup of the same backward pass.
    """
    indices, weights, offsets = _normalize(indices, weights, table, offsets)
    backend = _resolve_backend(backend, table)
    return _EmbeddingBagFunction.apply(weights, table, indices, offsets, bool(sparse_grad), backend, row_update)
