"""Optimizers and schedules: AdamW for the dense model; value pools in their own optimizer.

Value pools have their own learning rate (the paper: a fixed 1e-3, 10x the dense base rate),
their own weight decay and their own gradient clipping. With a sparse optimizer the pools'
gradients are row-sparse and the step touches only the rows a batch read; the row-sparse
optimizers of :mod:`memray.optim.sparse` make that step cost O(rows read), state included.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Literal

import torch

from memray.errors import ConfigError

from .sparse import STATE_DTYPES, BackwardUpdate, LazyAdam, LazyAdamW, RowSparseOptimizer, RowSparseSGD, RowWiseAdagrad

ValueOptimizerName = Literal["adamw", "sparse_adam", "rowwise_adagrad", "lazy_adam", "lazy_adamw", "sgd", "adagrad"]
VALUE_OPTIMIZERS = typing.get_args(ValueOptimizerName)
# memray's own row-sparse optimizers (memray.optim.sparse)
ROW_SPARSE_OPTIMIZERS = ("rowwise_adagrad", "lazy_adam", "lazy_adamw", "sgd")
# optimizers whose [N, D] state may be kept in bf16; the others have none or keep it in fp32
_BF16_STATE_OPTIMIZERS = ("lazy_adam", "lazy_adamw")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0  # on the dense parameters
    # Value pools. adamw: the paper's dense AdamW (dense N x D gradient and state); sparse_adam:
    # torch.optim.SparseAdam (lazy Adam, bias-corrected by the global step); adagrad: torch's
    # Adagrad on sparse gradients. Row-sparse, O(rows read) per step (memray.optim.sparse):
    # rowwise_adagrad (one fp32 accumulator per row), lazy_adam / lazy_adamw (per-row bias
    # correction; L2 / decoupled weight decay of the rows read), sgd.
    value_optimizer: ValueOptimizerName = "lazy_adam"
    value_state_dtype: Literal["fp32", "bf16"] = "fp32"  # Adam moments of lazy_adam / lazy_adamw
    # eps of the value optimizer; null: `eps` (torch's default 1e-10 for adagrad)
    value_eps: float | None = None
    value_lr_schedule: Literal["fixed", "cosine"] = "fixed"  # fixed: the pool's lr at every step
    value_grad_clip: float | None = 1.0
    # step: the value optimizer steps after the backward, over the pools' row-sparse gradients;
    # backward: each pool's lookup applies the rule to a row as soon as its gradient is summed
    # (CPU: one read and one write per touched row, no stored gradient). Needs a row-sparse
    # value_optimizer, value_grad_clip: null, one process, and each pool read by one layer.
    value_update: Literal["step", "backward"] = "step"

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {self.betas}")
        for name in ("grad_clip", "value_grad_clip", "value_eps"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(name, f"must be > 0 or null, got {v}")
        if self.value_optimizer not in VALUE_OPTIMIZERS:
            raise ConfigError(
                "value_optimizer", f"{self.value_optimizer!r} is not one of {', '.join(VALUE_OPTIMIZERS)}"
            )
        if self.value_state_dtype not in STATE_DTYPES:
            raise ConfigError(
                "value_state_dtype", f"{self.value_state_dtype!r} is not one of {', '.join(STATE_DTYPES)}"
            )
        if self.value_state_dtype != "fp32" and self.value_optimizer not in _BF16_STATE_OPTIMIZERS:
            raise ConfigError(
                "value_state_dtype",
                f"{self.value_state_dtype} state needs value_optimizer {' or '.join(_BF16_STATE_OPTIMIZERS)}, "
                f"not {self.value_optimizer}",
            )

        if self.value_update not in ("step", "backward"):
            raise ConfigError("value_update", f"{self.value_update!r} is not one of step, backward")
        if self.value_update == "backward":
            if self.value_optimizer not in ROW_SPARSE_OPTIMIZERS:
                raise ConfigError(
                    "value_update",
                    f"backward needs a row-sparse value_optimizer ({', '.join(ROW_SPARSE_OPTIMIZERS)}), "
                    f"not {self.value_optimizer}",
                )
            if self.value_grad_clip is not None:
                raise ConfigError(
                    "value_update",
                    "backward updates each row as soon as its gradient is summed, before the norm that "
                    "value_grad_clip divides by is known: set value_grad_clip: null",
                )

    @property
    def sparse_values(self) -> bool:
        return self.value_optimizer != "adamw"


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps`` (step is 0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def dense_param_groups(named_params, weight_decay: float) -> list[dict]:
    """Matrices decay; vectors (norms, biases, gains) do not."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_dense_optimizer(named_params, config: OptimConfig) -> torch.optim.AdamW:
    """The dense parameters' AdamW: ``config``'s lr, betas and eps, matrices decayed."""
    return torch.optim.AdamW(
        dense_param_groups(named_params, config.weight_decay), lr=config.lr, betas=tuple(config.betas), eps=config.eps
    )


def build_value_optimizer(config: OptimConfig, tables, all_reduce=None) -> torch.optim.Optimizer | None:
    """One optimizer over every value pool (:class:`memray.model.ValueTableBase`), one
    parameter group per pool.

    Each pool's group has its own lr (``table.lr``, else ``config.lr``) and, where the optimizer
    supports it, its own weight decay (``table.weight_decay``; torch's SparseAdam and Adagrad
    are built as before, without it). ``all_reduce`` sums a tensor over the ranks holding the
    other parts of the pools (a sharded run's memory-parallel group): row-wise Adagrad needs it
    for pools split by columns.
    """
    name = config.value_optimizer
    tables = list(tables)
    with_decay = name in ("adamw", "rowwise_adagrad", "lazy_adam", "lazy_adamw", "sgd")
    groups = []
    for table in tables:
        lr = table.lr if table.lr is not None else config.lr
        group = {"params": [table.weight], "lr": lr, "initial_lr": lr}
        if with_decay:
            group["weight_decay"] = table.weight_decay
        if name == "rowwise_adagrad":
            group["row_dim"] = table.dim  # the whole row, of which a column-sharded pool holds a slice
        groups.append(group)
    if not groups:
        return None
    eps = config.value_eps if config.value_eps is not None else config.eps
    betas = tuple(config.betas)
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=betas, eps=eps)
    if name == "sparse_adam":
        return torch.optim.SparseAdam(groups, betas=betas, eps=eps)
    if name == "adagrad":
        return torch.optim.Adagrad(groups) if config.value_eps is None else torch.optim.Adagrad(groups, eps=eps)
    if name == "rowwise_adagrad":
        return RowWiseAdagrad(groups, eps=eps, all_reduce=all_reduce)
    if name in ("lazy_adam", "lazy_adamw"):
        cls = LazyAdamW if name == "lazy_adamw" else LazyAdam
        return cls(groups, betas=betas, eps=eps, state_dtype=config.value_state_dtype)
    assert name == "sgd", name
    return RowSparseSGD(groups)


# torch's optimizers that a value pool may use, and their state entries indexed by the pool's rows
_TORCH_ROW_STATE = {
    torch.optim.AdamW: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.SparseAdam: ("exp_avg", "exp_avg_sq"),
    torch.optim.Adagrad: ("sum",),
}


def row_state_keys(optimizer: torch.optim.Optimizer) -> frozenset[str]:
    """The state entries of a value optimizer that hold one row (or one number) per table row:
    saved and resharded with the rows. Its other entries (step counts) are per table."""
    if isinstance(optimizer, RowSparseOptimizer):
        return frozenset(optimizer.row_state)
    for cls, keys in _TORCH_ROW_STATE.items():
        if type(optimizer) is cls:
            return frozenset(keys)
    raise ValueError(f"no per-row state is known for value optimizer {type(optimizer).__name__}")


def grad_norm(params, all_reduce=None) -> torch.Tensor:
    """L2 norm over the gradients of ``params``, dense or sparse COO (coalesced by clip_grads).

    ``all_reduce``: sums a tensor over the ranks that hold the other parts of ``params`` (the
    shards of sharded pools), so every rank gets the norm of the whole; called on every rank."""
    squares = [
        (p.grad._values() if p.grad.is_sparse else p.grad).float().pow(2).sum() for p in params if p.grad is not None
    ]
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    if all_reduce is not None:
        total = all_reduce(total)
    return total.sqrt()


def clip_grads(params, max_norm: float | None, all_reduce=None) -> float:
    """Scale gradients so their joint norm is at most ``max_norm``; returns the norm before."""
    params = [p for p in params if p.grad is not None]
    for p in params:
        # a pool read by several layers accumulates one sparse gradient per layer: sum the
        # duplicate rows before measuring or scaling
        if p.grad.is_sparse and not p.grad.is_coalesced():
            p.grad = p.grad.coalesce()
    norm = grad_norm(params, all_reduce)
    if max_norm is not None:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            (p.grad._values() if p.grad.is_sparse else p.grad).mul_(scale.to(p.grad.dtype))
    return float(norm)


__all__ = [
    "BackwardUpdate",
    "LazyAdam",
    "LazyAdamW",
    "OptimConfig",
    "RowSparseOptimizer",
    "RowSparseSGD",
    "RowWiseAdagrad",
    "VALUE_OPTIMIZERS",
    "build_dense_optimizer",
    "build_value_optimizer",
    "clip_grads",
    "dense_param_groups",
    "grad_norm",
    "lr_factor",
    "row_state_keys",
]
