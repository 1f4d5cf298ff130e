"""The memory layer's query and sub-key norms, fused: one pass over each row.

``x`` is ``[outer, groups, inner, d]``; every row of ``d`` numbers belongs to group
``(row // inner) % groups``. Per row, optionally a LayerNorm over ``d`` with a per-group affine
(``ln_weight``, ``ln_bias`` ``[groups, d]``), then optionally an RMS norm of each of ``splits``
equal segments times a per-group ``gain`` ``[groups, d]`` and ``scale``::

    y = (x - mean(x)) / sqrt(var(x) + ln_eps) * ln_weight + ln_bias      (or y = x)
    z = y / sqrt(mean(y_seg ** 2) + rms_eps) * gain * scale               (or z = y)

Queries are ``[tokens, heads, 1, k_dim]`` with two segments (the halves), sub-keys
``[1, heads * 2, n_keys, half]`` with one. In torch ops this is a dozen elementwise passes over
the whole tensor forward and more backward; :func:`row_norm` does it in one C++ pass per row
(CPU, fp32/fp64), its backward recomputing the row's statistics. :func:`row_norm_reference` is
the same computation in torch ops: the fallback elsewhere (CUDA, no C++ kernels).
"""

import torch
import torch.nn.functional as F

from . import _alloc, cpu_ext


def row_norm_reference(
    x, groups, inner, splits, ln_weight=None, ln_bias=None, gain=None, scale=1.0, ln_eps=1e-5, rms_eps=1e-6
):
    """:func:`row_norm` in torch ops (any device and dtype autograd supports)."""
    shape, d = x.shape, x.shape[-1]
    y = x.reshape(-1, groups, inner, d)
    if ln_weight is not None:
        y = F.layer_norm(y, (d,), eps=ln_eps) * ln_weight[:, None] + ln_bias[:, None]
    if gain is not None:
        y = y.reshape(*y.shape[:3], splits, d // splits)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + rms_eps)
        y = y.reshape(*y.shape[:3], d) * gain[:, None] * scale
    return y.reshape(shape)


def row_norm(x, groups, inner, splits, ln_weight=None, ln_bias=None, gain=None, scale=1.0, ln_eps=1e-5, rms_eps=1e-6):
    """The norms of the module docstring, differentiable in ``x`` and every parameter given.
    The C++ kernels on CPU fp32/fp64 tensors; :func:`row_norm_reference` otherwise."""
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("ln_weight and ln_bias come together")
    d = x.shape[-1]
    if d % splits or x.numel() % (groups * inner * d):
        raise ValueError(f"x {tuple(x.shape)} is not [outer, {groups}, {inner}, d] with d divisible by {splits}")
    params = [p for p in (ln_weight, ln_bias, gain) if p is not None]
    ops = None
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and all(p.dtype == x.dtype for p in params):
        ops = cpu_ext.load()
    if ops is None:
        return row_norm_reference(x, groups, inner, splits, ln_weight, ln_bias, gain, scale, ln_eps, rms_eps)
    return _RowNorm.apply(x, ln_weight, ln_bias, gain, (groups, inner, splits, float(scale), ln_eps, rms_eps), ops)


class _RowNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, gain, shape, ops):
        x = x.detach().contiguous()
        params = [None if p is None else p.detach().contiguous() for p in (ln_weight, ln_bias, gain)]
        out = _alloc.empty(*x.shape, dtype=x.dtype, device="cpu")
        groups, inner, splits, scale, ln_eps, rms_eps = shape
        ops.row_norm_forward(x, groups, inner, splits, *params, scale, ln_eps, rms_eps, out)
        ctx.save_for_backward(x, *(p if p is not None else torch.empty(0) for p in params))
        ctx.present = [p is not None for p in params]
        ctx.shape, ctx.ops = shape, ops
        return out

    @staticmethod
    def backward(ctx, grad):
        x, *saved = ctx.saved_tensors
        params = [p if present else None for p, present in zip(saved, ctx.present)]
        groups, inner, splits, scale, ln_eps, rms_eps = ctx.shape
        d = x.shape[-1]
        blocks = -(-(x.numel() // d) // ctx.ops.row_norm_block())
        wanted = [ctx.needs_input_grad[i + 1] and params[i] is not None for i in range(3)]
        parts = [torch.empty(blocks, groups, d, dtype=x.dtype) if w else None for w in wanted]
        dx = _alloc.empty(*x.shape, dtype=x.dtype, device="cpu")
        ctx.ops.row_norm_backward(
            grad.contiguous(), x, groups, inner, splits, *params, scale, ln_eps, rms_eps, dx, *parts
        )
        # the blocks' partial sums in order: the same result for any thread count
        grads = [None if part is None else part.sum(0) for part in parts]
        return (dx if ctx.needs_input_grad[0] else None), *grads, None, None
