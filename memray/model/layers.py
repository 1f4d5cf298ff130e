"""Building blocks of the decoder: RMSNorm, rotary embeddings, causal attention, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # at least fp32
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Rotary(nn.Module):
    """Rotary position embedding tables (not saved: derived from head_dim, length and theta)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0, device=None):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2, device=device), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2, device=device), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.cos.is_meta:
            return
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, self.head_dim, 2, device=self.cos.device).float() / self.head_dim)
        )
        angles = torch.outer(torch.arange(self.max_seq_len, device=self.cos.device).float(), inv_freq)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """x: [batch, heads, seq, head_dim] at positions ``start .. start + seq - 1``."""
        seq = x.shape[-2]
        if start + seq > self.max_seq_len:
            raise ValueError(f"positions up to {start + seq} exceed max_seq_len={self.max_seq_len}")
        cos, sin = self.cos[start : start + seq].to(x.dtype), self.sin[start : start + seq].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, max_seq_len: int, rope_theta: float, dropout: float = 0.0, device=None):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False, device=device)
        self.proj = nn.Linear(dim, dim, bias=False, device=device)
        self.rotary = Rotary(self.head_dim, max_seq_len, rope_theta, device=device)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """Causal self-attention over ``x`` [batch, seq, dim]; with ``cache``, ``x`` continues the
        tokens the cache holds (their keys and values are read from it, and ``x``'s appended)."""
        batch, seq, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        start = 0 if cache is None else cache.length
        q, k = self.rotary(q, start), self.rotary(k, start)
        mask, causal = None, True
        if cache is not None:
            k, v = cache.append(k, v)
            if start and seq == 1:
                causal = False  # one new token sees every cached one
            elif start:  # new token i sits at position start + i and sees keys up to there
                positions = torch.arange(start + seq, device=x.device)
                mask, causal = positions[None, :] <= positions[start:, None], False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(batch, seq, dim))


class LayerCache:
    """One attention layer's keys and values [batch, heads, max_len, head_dim], preallocated;
    ``length`` (shared by the layers of a :class:`KVCache`) tokens of them are filled."""

    def __init__(self, owner: KVCache, keys: torch.Tensor, values: torch.Tensor):
        self.owner, self.keys, self.values = owner, keys, values

    @property
    def length(self) -> int:
        return self.owner.length

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' ``k``, ``v`` after the cached ones; all of them, up to the new."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"the cache holds {self.keys.shape[2]} positions; {end} were asked for")
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Keys and values of every attention layer of a model for a batch of sequences, so that
    decoding runs each new token through the model once (O(n) attention per token, not a
    recomputation of the whole prefix). ``Transformer.forward(tokens, cache)`` fills it and
    advances ``length`` by the tokens it was given."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int, *, device, dtype):
        self.length = 0
        self.layers = [
            LayerCache(
                self,
                torch.empty(batch, n_heads, max_len, head_dim, device=device, dtype=dtype),
                torch.empty(batch, n_heads, max_len, head_dim, device=device, dtype=dtype),
            )
            for _ in range(n_layers)
        ]


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, device=None):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False, device=device)
        self.up = nn.Linear(dim, hidden, bias=False, device=device)
        self.down = nn.Linear(hidden, dim, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))
