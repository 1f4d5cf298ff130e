"""Fused optimizer updates of the touched rows of a value table.

A row-sparse optimizer step written with torch ops makes several passes over [U, D]
temporaries; the fused kernels update each touched row in one visit. Each function returns
``False`` when no fused kernel serves its inputs (device, dtype, layout, no compiled
extension), and the caller then runs its torch-op version of the same rule.
"""
import torch

from . import cpu_ext


def _rows_contiguous(t: torch.Tensor) -> bool:
    return t.dim() == 2 and (t.shape[1] <= 1 or t.stride(1) == 1)


def rowwise_adagrad_(table, sum_sq, rows, row_grads, lr: float, eps: float, weight_decay: float = 0.0) -> bool:
    """Exact row-wise Adagrad on ``rows`` (unique, increasing), in place.

    With ``g = row_grads[u] + weight_decay * table[rows[u]]``:
    ``sum_sq[r] += mean(g**2)``; ``table[r] -= lr * g / (sqrt(sum_sq[r]) + eps)``.
    ``table`` [N, D] fp32 or bf16, ``sum_sq`` [N] fp32, ``row_grads`` [U, D] fp32.
    """
    if not (table.device.type == "cpu" and table.dtype in (torch.float32, torch.bfloat16)
            and row_grads.dtype == torch.float32 and sum_sq.dtype == torch.float32
            and _rows_contiguous(table) and _rows_contiguous(row_grads) and sum_sq.is_contiguous()
            and rows.dtype == torch.int64 and rows.is_contiguous()):
        return False
    ops = cpu_ext.load()
    if ops is None:
        return False
    ops.rowwise_adagrad(table, sum_sq, rows, row_grads, float(lr), float(eps), float(weight_decay))
    return True
