"""Low-rank adapters (LoRA, Hu et al. 2021) on the attention and SwiGLU projections.

``LoRALinear`` is an ``nn.Linear`` whose output gains ``(x @ A^T) @ B^T * alpha / rank``, with
``A`` [rank, in] drawn like a linear layer's weight and ``B`` [out, rank] zero, so an adapted
model computes exactly what the model without adapters computes until ``B`` trains. The
adapters are parameters of the model (``<linear>.lora_a``, ``<linear>.lora_b`` in its state
dict) when ``ModelConfig.lora_rank > 0``: a checkpoint of an adapted model is an ordinary
checkpoint of that model config, read by every command that reads checkpoints.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Linear):
    """``nn.Linear`` (no bias) plus a rank-``rank`` update scaled by ``alpha / rank``."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, device=None):
        super().__init__(in_features, out_features, bias=False, device=device)
        self.rank, self.scale = rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank, device=device))
        self.reset_lora()

    def reset_lora(self) -> None:
        """``A`` as ``nn.Linear`` draws a weight (Kaiming-uniform), ``B`` zero: no change at first."""
        if self.lora_a.is_meta:
            return
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            self.lora_b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight of the plain linear layer computing the same function."""
        return self.weight + (self.lora_b @ self.lora_a) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def adapted(linear: nn.Linear, rank: int, alpha: float) -> LoRALinear:
    """A :class:`LoRALinear` of ``linear``'s shape and device (its weight is initialised by the
    model's own ``init_weights`` or loaded, like the layer it replaces)."""
    if linear.bias is not None:
        raise ValueError("LoRA adapters here wrap bias-free projections")
    return LoRALinear(linear.in_features, linear.out_features, rank, alpha, device=linear.weight.device)


def is_lora_parameter(name: str) -> bool:
    return name.endswith((".lora_a", ".lora_b"))
