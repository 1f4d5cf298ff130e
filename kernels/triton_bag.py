"""Triton kernels for the value lookup of product-key memory layers.

Two kernels cover forward and backward:

* ``_bag_sum_kernel`` computes ``out[b] = sum_e w[e] * src[idx[e]]`` over the CSR segment of
  ``b``. The forward pass runs it with (``table``, bags); the row-sparse table gradient runs it
  with (``grad_out``, unique table rows), because ``dT[row] = sum_{e: idx[e] = row} w[e] *
  grad_out[bag(e)]`` is the same bag sum once the entries are sorted by row. Each program owns
  its output block, so the table gradient needs no float atomics and is deterministic.
* ``_bag_dot_kernel`` computes ``grad_w[e] = <grad_out[bag(e)], table[idx[e]]>``.

Accumulation is in ``ACC`` (float32, or float64 for float64 inputs). Row numbers are cast to
int64 before multiplying by a row stride, so tables with more than 2**31 elements are
addressed correctly. Launchers expect caller-allocated outputs and row-contiguous 2-D operands.
"""

import torch
import triton
import triton.language as tl

# Entries processed per loop step: a [BL, BD] tile of gathered rows is reduced per iteration.
_BLOCK_L = 16
_BLOCK_E = 16
_MAX_BLOCK_D = 128


@triton.jit
def _to_acc(x, ACC: tl.constexpr):
    # bf16 -> fp32 is exact; going through fp32 also keeps bf16 -> fp64 correct under the
    # interpreter, which only converts bf16 to and from fp32.
    if x.dtype == tl.bfloat16:
        x = x.to(tl.float32)
    return x.to(ACC)


@triton.jit
def _to_out(x, OUT: tl.constexpr):
    # fp64 -> bf16 via fp32, for the same interpreter limitation as `_to_acc`.
    if OUT == tl.bfloat16:
        x = x.to(tl.float32)
    return x.to(OUT)


@triton.jit
def _bag_sum_kernel(
    indices,  # [nnz] int64, rows of `src`
    weights,  # [nnz]
    src,  # [N, D]
    offsets,  # [B + 1] int64, CSR segment bounds
    out,  # [B, D]
    stride_s,
    stride_o,
    D,
    ACC: tl.constexpr,
    BL: tl.constexpr,
    BD: tl.constexpr,
):
    i_b, i_d = tl.program_id(0), tl.program_id(1)
    bos = tl.load(offsets + i_b).to(tl.int64)
    eos = tl.load(offsets + i_b + 1).to(tl.int64)

    o_d = i_d * BD + tl.arange(0, BD)  # [BD]
    m_d = o_d < D
    b_o = tl.zeros([BD], dtype=ACC)
    # Empty segments skip the loop and store zeros.
    for i_l in range(bos, eos, BL):
        o_l = i_l + tl.arange(0, BL)  # [BL]
        m_l = o_l < eos
        b_i = tl.load(indices + o_l, mask=m_l, other=0).to(tl.int64)  # [BL]
        b_w = _to_acc(tl.load(weights + o_l, mask=m_l, other=0.0), ACC)  # [BL]
        p_s = src + b_i[:, None] * stride_s + o_d[None, :]  # [BL, BD]
        b_s = _to_acc(tl.load(p_s, mask=m_l[:, None] & m_d[None, :], other=0.0), ACC)  # [BL, BD]
        b_o += tl.sum(b_s * b_w[:, None], axis=0)

    p_o = out + i_b.to(tl.int64) * stride_o + o_d  # [BD]
    tl.store(p_o, _to_out(b_o, out.dtype.element_ty), mask=m_d)


@triton.jit
def _bag_dot_kernel(
    grad_out,  # [B, D]
    indices,  # [nnz] int64, rows of `table`
    bag_ids,  # [nnz] int64, bag of each entry
    table,  # [N, D]
    grad_weights,  # [nnz]
    nnz,
    stride_g,
    stride_t,
    D,
    ACC: tl.constexpr,
    BE: tl.constexpr,
    BD: tl.constexpr,
):
    i_e = tl.program_id(0)
    o_e = i_e.to(tl.int64) * BE + tl.arange(0, BE)  # [BE]
    m_e = o_e < nnz
    b_i = tl.load(indices + o_e, mask=m_e, other=0).to(tl.int64)  # [BE]
    b_b = tl.load(bag_ids + o_e, mask=m_e, other=0).to(tl.int64)  # [BE]

    b_dw = tl.zeros([BE], dtype=ACC)
    for i_d in range(0, D, BD):
        o_d = i_d + tl.arange(0, BD)  # [BD]
        m = m_e[:, None] & (o_d < D)[None, :]  # [BE, BD]
        p_t = table + b_i[:, None] * stride_t + o_d[None, :]  # [BE, BD]
        p_g = grad_out + b_b[:, None] * stride_g + o_d[None, :]  # [BE, BD]
        b_t = _to_acc(tl.load(p_t, mask=m, other=0.0), ACC)
        b_g = _to_acc(tl.load(p_g, mask=m, other=0.0), ACC)
        b_dw += tl.sum(b_t * b_g, axis=1)

    tl.store(grad_weights + o_e, _to_out(b_dw, grad_weights.dtype.element_ty), mask=m_e)


def _tl_dtype(dtype):
    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


def _block_d(D):
    return max(16, min(_MAX_BLOCK_D, triton.next_power_of_2(D)))


def bag_sum_constexprs(acc_dtype: torch.dtype, D: int) -> dict:
    """``_bag_sum_kernel``'s compile-time parameters: what :func:`bag_sum` launches with and what
    :func:`launches` compiles ahead of time."""
    return {"ACC": _tl_dtype(acc_dtype), "BL": _BLOCK_L, "BD": _block_d(D)}


def bag_dot_constexprs(acc_dtype: torch.dtype, D: int) -> dict:
    """``_bag_dot_kernel``'s compile-time parameters (see :func:`bag_sum_constexprs`)."""
    return {"ACC": _tl_dtype(acc_dtype), "BE": _BLOCK_E, "BD": _block_d(D)}


def bag_sum(indices, weights, src, offsets, out, acc_dtype):
    """Fill ``out[b] = sum_e weights[e] * src[indices[e]]`` for each CSR segment ``b``."""
    num_bags, D = out.shape
    if num_bags == 0 or D == 0:
        return out
    constexprs = bag_sum_constexprs(acc_dtype, D)
    grid = (num_bags, triton.cdiv(D, constexprs["BD"]))
    _bag_sum_kernel[grid](indices, weights, src, offsets, out, src.stride(0), out.stride(0), D, **constexprs)
    return out


def bag_dot(grad_out, indices, bag_ids, table, grad_weights, acc_dtype):
    """Fill ``grad_weights[e] = <grad_out[bag_ids[e]], table[indices[e]]>``."""
    nnz = indices.numel()
    if nnz == 0:
        return grad_weights
    D = table.shape[1]
    constexprs = bag_dot_constexprs(acc_dtype, D)
    grid = (triton.cdiv(nnz, constexprs["BE"]),)
    _bag_dot_kernel[grid](
        grad_out, indices, bag_ids, table, grad_weights, nnz, grad_out.stride(0), table.stride(0), D, **constexprs
    )
    return grad_weights


#: (table, weights) dtypes the lookup launches these kernels with: fp32 and bf16 tables read with
#: the layer's fp32 softmax weights (or bf16 ones), and fp64 for the float64 reference checks
LOOKUP_DTYPES = (
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float64, torch.float64),
)
#: value dims, one per block size ``_block_d`` can choose (16, 32, 64, 128)
LOOKUP_DIMS = (16, 32, 64, 256)


def launches() -> list:
    """Every compilation of these kernels the lookup can launch (:class:`memray.kernels.aot.Launch`):
    forward, the weights' gradient and the row-sparse table gradient of each table and weights
    dtype, at each block size."""
    from .aot import Launch
    from .embedding_bag import _acc_dtype

    out = []
    for table, weights in LOOKUP_DTYPES:
        bags = torch.promote_types(table, weights)  # the forward's output, and its gradient
        acc = _acc_dtype(table, weights, bags)
        for D in LOOKUP_DIMS:
            where = f"table {table}, weights {weights}, D {D}"
            sum_args = dict(indices=torch.int64, offsets=torch.int64, weights=weights)
            out += [
                Launch(
                    _bag_sum_kernel,
                    {**sum_args, "src": table, "out": bags},
                    bag_sum_constexprs(acc, D),
                    f"forward: {where}",
                ),
                Launch(
                    _bag_sum_kernel,
                    {**sum_args, "src": bags, "out": table},
                    bag_sum_constexprs(acc, D),
                    f"table gradient: {where}",
                ),
                Launch(
                    _bag_dot_kernel,
                    dict(grad_out=bags, indices=torch.int64, bag_ids=torch.int64, table=table, grad_weights=weights),
                    bag_dot_constexprs(acc, D),
                    f"weights gradient: {where}",
                ),
            ]
    return out
