"""Fused optimizer updates of the touched rows of a value table.

A row-sparse optimizer step written with torch ops makes several passes over [U, D]
temporaries; the fused kernels update each touched row in one visit. Each function returns
``False`` when no fused kernel serves its inputs (device, dtype, layout, no compiled
extension), and the caller then runs its torch-op version of the same rule.

:class:`BackwardRowUpdate` is the other way to run a rule: the lookup's backward
(:func:`memray.kernels.embedding_bag` with ``row_update=``) applies it to each row as soon as
that row's gradient is summed, so the row is read and written once per step and its gradient
is never stored.
"""

from abc import ABC, abstractmethod

import torch

from . import cpu_ext


def _rows_contiguous(t: torch.Tensor) -> bool:
    return t.dim() == 2 and (t.shape[1] <= 1 or t.stride(1) == 1)


def _fused_ops(table, rows, row_grads):
    """The extension's ops when they serve these inputs, else ``None``."""
    if not (
        table.device.type == "cpu"
        and table.dtype in (torch.float32, torch.bfloat16)
        and row_grads.dtype == torch.float32
        and _rows_contiguous(table)
        and _rows_contiguous(row_grads)
        and rows.dtype == torch.int64
        and rows.is_contiguous()
    ):
        return None
    return cpu_ext.load()


def rowwise_adagrad_(table, sum_sq, rows, row_grads, lr: float, eps: float, weight_decay: float = 0.0) -> bool:
    """Exact row-wise Adagrad on ``rows`` (unique, increasing), in place.

    With ``g = row_grads[u] + weight_decay * table[rows[u]]``:
    ``sum_sq[r] += mean(g**2)``; ``table[r] -= lr * g / (sqrt(sum_sq[r]) + eps)``.
    ``table`` [N, D] fp32 or bf16, ``sum_sq`` [N] fp32, ``row_grads`` [U, D] fp32.
    """
    ops = _fused_ops(table, rows, row_grads)
    if ops is None or sum_sq.dtype != torch.float32 or not sum_sq.is_contiguous():
        return False
    ops.rowwise_adagrad(table, sum_sq, rows, row_grads, float(lr), float(eps), float(weight_decay))
    return True


def lazy_adam_(
    table,
    exp_avg,
    exp_avg_sq,
    row_step,
    rows,
    row_grads,
    lr: float,
    betas,
    eps: float,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> bool:
    """Adam on ``rows`` (unique, increasing) with a per-row step count ``row_step`` [N] int32, in
    place; L2 (``decoupled=False``) or decoupled weight decay of those rows.

    ``t = ++row_step[r]``; ``m, v`` updated in fp32 and stored in their dtype (fp32 or bf16);
    ``w -= lr * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps * sqrt(1 - b2**t))``.
    """
    ops = _fused_ops(table, rows, row_grads)
    if (
        ops is None
        or exp_avg.dtype not in (torch.float32, torch.bfloat16)
        or exp_avg_sq.dtype != exp_avg.dtype
        or not exp_avg.is_contiguous()
        or not exp_avg_sq.is_contiguous()
        or row_step.dtype != torch.int32
        or not row_step.is_contiguous()
    ):
        return False
    beta1, beta2 = betas
    ops.lazy_adam(
        table,
        exp_avg,
        exp_avg_sq,
        row_step,
        rows,
        row_grads,
        float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        bool(decoupled),
    )
    return True


def sgd_(table, rows, row_grads, lr: float, weight_decay: float = 0.0) -> bool:
    """``table[r] -= lr * (row_grads[u] + weight_decay * table[r])`` on ``rows``, in place."""
    ops = _fused_ops(table, rows, row_grads)
    if ops is None:
        return False
    ops.sgd(table, rows, row_grads, float(lr), float(weight_decay))
    return True


class BackwardRowUpdate(ABC):
    """An optimizer rule that a lookup's backward applies to the rows it read, in place of
    returning their gradient (the table's gradient stays ``None``).

    Where the C++ kernels serve the lookup (CPU, fp32 or bf16 table, fp32 accumulation), the
    rule runs inside the backward's visit of each row (``fused_rule``); elsewhere the backward
    computes the fp32 row gradients as usual and hands them to ``apply``. Either way ``record``
    receives each touched row's squared gradient norm [U] fp32 (before the rule's weight decay).
    """

    @abstractmethod
    def fused_rule(self, table: torch.Tensor) -> tuple[str, dict] | None:
        """``(rule, arguments)`` of the fused kernel for ``table``, or ``None`` when none serves it.

        rule ``"rowwise_adagrad"``: ``sum_sq, lr, eps, weight_decay``; ``"lazy_adam"``:
        ``exp_avg, exp_avg_sq, row_step, lr, beta1, beta2, eps, weight_decay, decoupled``;
        ``"sgd"``: ``lr, weight_decay`` (the arguments of :func:`rowwise_adagrad_`,
        :func:`lazy_adam_` and :func:`sgd_`).
        """

    @abstractmethod
    def apply(self, table: torch.Tensor, rows: torch.Tensor, row_grads: torch.Tensor) -> None:
        """The rule on ``rows`` (unique, increasing) with their fp32 gradients [U, D]."""

    @abstractmethod
    def record(self, row_sq: torch.Tensor) -> None:
        """Squared norms [U] of the gradients of the rows just updated."""


#: rules with a fused C++ backward (op ``bag_backward_<rule>`` of the extension)
FUSED_RULES = ("rowwise_adagrad", "lazy_adam", "sgd")
