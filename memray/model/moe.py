"""Top-k routed mixture of SwiGLU experts: the baseline memory layers are compared against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memray.errors import ConfigError


@dataclass(kw_only=True)
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    hidden: int | None = None  # per expert; None: the dense FFN hidden size
    aux_loss_coef: float = 0.01  # Switch-style load-balancing loss

    def __post_init__(self):
        if self.num_experts < 1:
            raise ConfigError("num_experts", f"must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError("top_k", f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.hidden is not None and self.hidden < 1:
            raise ConfigError("hidden", f"must be >= 1, got {self.hidden}")


class MoE(nn.Module):
    def __init__(self, dim: int, hidden: int, config: MoEConfig, device=None):
        super().__init__()
        self.config = config
        e = config.num_experts
        self.router = nn.Linear(dim, e, bias=False, device=device)
        self.w_gate = nn.Parameter(torch.empty(e, dim, hidden, device=device))
        self.w_up = nn.Parameter(torch.empty(e, dim, hidden, device=device))
        self.w_down = nn.Parameter(torch.empty(e, hidden, dim, device=device))
        self.aux_loss = torch.zeros(())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.w_gate.is_meta:
            return
        with torch.no_grad():
            for w in (self.w_gate, self.w_up, self.w_down):
                w.normal_(0.0, w.shape[1] ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(x).float(), dim=-1)  # [T, E]
        gate, expert = probs.topk(self.config.top_k, dim=-1)  # [T, k]
        gate = (gate / gate.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(self.config.num_experts):
            token, slot = (expert == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            xe = x[token]
            ye = (F.silu(xe @ self.w_gate[e]) * (xe @ self.w_up[e])) @ self.w_down[e]
            out.index_add_(0, token, (ye * gate[token, slot, None]).to(out.dtype))
        # fraction of routed tokens per expert times mean router probability (Switch Transformer)
        load = F.one_hot(expert, self.config.num_experts).float().sum((0, 1)) / expert.numel()
        self.aux_loss = self.config.num_experts * (load * probs.mean(0)).sum()
        return out.view(shape)
