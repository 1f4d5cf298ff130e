"""Optimizers and schedules: AdamW for the dense model; value pools in their own optimizer.

Value pools have their own learning rate (the paper: a fixed 1e-3, 10x the dense base rate),
their own weight decay and their own gradient clipping. With a sparse optimizer the pools'
gradients are row-sparse and the step touches only the rows a batch read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from memray.errors import ConfigError


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
    # lazy Adam on the touched rows (torch.optim.SparseAdam); adagrad / sgd: torch's, sparse.
    value_optimizer: Literal["adamw", "sparse_adam", "adagrad", "sgd"] = "sparse_adam"
    value_lr_schedule: Literal["fixed", "cosine"] = "fixed"  # fixed: the pool's lr at every step
    value_grad_clip: float | None = 1.0

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {self.betas}")
        for name in ("grad_clip", "value_grad_clip"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(name, f"must be > 0 or null, got {v}")

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


def build_value_optimizer(config: OptimConfig, tables) -> torch.optim.Optimizer | None:
    """One optimizer over every value pool, one parameter group per pool (its own lr)."""
    groups = []
    for table in tables:
        lr = table.lr if table.lr is not None else config.lr
        group = {"params": [table.weight], "lr": lr, "initial_lr": lr}
        if config.value_optimizer == "adamw":
            group["weight_decay"] = table.weight_decay
        groups.append(group)
    if not groups:
        return None
    if config.value_optimizer == "adamw":
        return torch.optim.AdamW(groups, betas=tuple(config.betas), eps=config.eps)
    if config.value_optimizer == "sparse_adam":
        return torch.optim.SparseAdam(groups, betas=tuple(config.betas), eps=config.eps)
    if config.value_optimizer == "adagrad":
        return torch.optim.Adagrad(groups)
    return torch.optim.SGD(groups)


def grad_norm(params) -> torch.Tensor:
    """L2 norm over the gradients of ``params``, dense or sparse COO (coalesced by clip_grads)."""
    squares = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        squares.append((g._values() if g.is_sparse else g).float().pow(2).sum())
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())


def clip_grads(params, max_norm: float | None) -> float:
    """Scale gradients so their joint norm is at most ``max_norm``; returns the norm before."""
    params = [p for p in params if p.grad is not None]
    for p in params:
        # a pool read by several layers accumulates one sparse gradient per layer: sum the
        # duplicate rows before measuring or scaling
        if p.grad.is_sparse and not p.grad.is_coalesced():
            p.grad = p.grad.coalesce()
    norm = grad_norm(params)
    if max_norm is not None:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            (p.grad._values() if p.grad.is_sparse else p.grad).mul_(scale.to(p.grad.dtype))
    return float(norm)


__all__ = ["OptimConfig", "build_value_optimizer", "clip_grads", "dense_param_groups", "grad_norm", "lr_factor"]
