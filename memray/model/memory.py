"""Product-key memory layer (Lample et al. 2019) with the Memory+ changes of Berges et al. 2024.

``ProductKeyMemory`` is the specification of the layer: sharded value tables only change where
the values live and must reproduce it numerically. A layer reads its values from a value table
(:class:`memray.model.values.ValueTableBase`), given at construction; several layers may share one
table (a named *pool*), which then lives with the model rather than with any one layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from memray.errors import ConfigError
from memray.kernels.pk_search import pk_search
from memray.kernels.row_norm import row_norm, row_norm_reference

from .values import ValueTable, ValueTableBase


@dataclass(kw_only=True)
class MemoryConfig:
    """Every knob of a memory layer. ``n_keys ** 2`` value slots per pool."""

    n_keys: int = 128
    heads: int = 4
    knn: int = 32
    k_dim: int = 256
    v_dim: int | None = None  # None: the model dim
    swilu: bool = True  # Memory+: out = W_o(y * silu(W_s x))
    gate: bool = False  # scalar sigmoid gate per token on the layer output
    # RMS-norm query halves and sub-keys (learnable gains): the factual-recall ablation's clearest
    # win (74.8% against 58.0%, benchmarks/README.md); the paper describes it, its code lacks it
    qk_norm: bool = True
    query_layernorm: bool = False  # LayerNorm of each head's query before the split
    query_bias: bool = True
    input_dropout: float = 0.0
    query_dropout: float = 0.0
    value_dropout: float = 0.0  # dropout on the softmax weights of the selected slots
    value_init_std: float | None = None  # None: v_dim ** -0.5
    # the pools' storage: bf16 halves a table's memory (lookups and optimizer arithmetic stay fp32)
    value_dtype: Literal["fp32", "bf16"] = "fp32"
    value_lr: float | None = 1e-3  # fixed lr of the value pools; None: follow the dense schedule
    value_weight_decay: float = 0.0
    track_usage: bool = True
    backend: Literal["auto", "torch", "triton"] = "auto"
    # Sharding over ranks (memray.distributed); ignored by a single process.
    layout: Literal["row", "column"] = "row"  # row: ranks own row ranges; column: value-dim slices
    parallel_size: int | None = None  # ranks per memory-parallel group; None: the whole world

    def __post_init__(self):
        if self.heads < 1:
            raise ConfigError("heads", f"must be >= 1, got {self.heads}")
        if self.n_keys < 1:
            raise ConfigError("n_keys", f"must be >= 1, got {self.n_keys}")
        if self.knn < 1:
            raise ConfigError("knn", f"must be >= 1, got {self.knn}")
        if self.n_keys**2 < self.knn:
            raise ConfigError("knn", f"{self.knn} exceeds the number of slots n_keys**2 = {self.n_keys**2}")
        if self.k_dim < 2 or self.k_dim % 2:
            raise ConfigError("k_dim", f"must be even and >= 2 (split into two halves), got {self.k_dim}")
        if self.v_dim is not None and self.v_dim < 1:
            raise ConfigError("v_dim", f"must be >= 1, got {self.v_dim}")
        for name in ("input_dropout", "query_dropout", "value_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {p}")
        if self.value_lr is not None and self.value_lr <= 0:
            raise ConfigError("value_lr", f"must be > 0 or null, got {self.value_lr}")
        if self.parallel_size is not None and self.parallel_size < 1:
            raise ConfigError("parallel_size", f"must be >= 1 or null, got {self.parallel_size}")

    @property
    def num_slots(self) -> int:
        return self.n_keys**2

    @property
    def value_torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.value_dtype == "bf16" else torch.float32


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and softmax run in fp32 at least (fp64 layers stay fp64, for reference checks)."""
    return torch.promote_types(dtype, torch.float32)


def _half_scores_of(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Query halves [T, H, 2, half] against sub-keys [H, 2, n_keys, half] -> [T, H, 2, n_keys]."""
    return torch.einsum("thsd,hsnd->thsn", q, keys)


class ProductKeyMemory(nn.Module):
    """A memory layer: ``forward(x[..., dim]) -> [..., dim]``.

    For each head, the query splits into halves scored against two sub-key tables of
    ``n_keys`` keys; the top-``knn`` of the ``knn**2`` sums of per-half top-``knn`` scores are
    exactly the top-``knn`` of all ``n_keys**2`` slots (slot ``i * n_keys + j``). All heads'
    slots form one bag, weighted by a softmax (fp32) over each head's selected scores.

    ``values``: a table owned elsewhere (a pool of the model, possibly sharded); when omitted the
    layer creates and owns an unsharded :class:`ValueTable`.
    """

    def __init__(self, dim: int, config: MemoryConfig, values: ValueTableBase | None = None, *, device=None):
        super().__init__()
        c = config
        self.dim = dim
        self.config = c
        self.v_dim = c.v_dim or dim
        self.half_dim = c.k_dim // 2
        self.query_proj = nn.Linear(dim, c.heads * c.k_dim, bias=c.query_bias, device=device)
        self.keys = nn.Parameter(torch.empty(c.heads, 2, c.n_keys, self.half_dim, device=device))
        if c.query_layernorm:
            self.query_norm_weight = nn.Parameter(torch.empty(c.heads, c.k_dim, device=device))
            self.query_norm_bias = nn.Parameter(torch.empty(c.heads, c.k_dim, device=device))
        if c.qk_norm:
            self.query_gain = nn.Parameter(torch.empty(c.heads, 2, self.half_dim, device=device))
            self.key_gain = nn.Parameter(torch.empty(c.heads, 2, self.half_dim, device=device))
        if c.swilu:
            self.swilu_proj = nn.Linear(dim, self.v_dim, device=device)
        if c.swilu or self.v_dim != dim:
            self.out_proj = nn.Linear(self.v_dim, dim, device=device)
        if c.gate:
            self.gate_proj = nn.Linear(dim, 1, device=device)
        if values is None:
            self.value_table = ValueTable.from_config(c, dim, device=device)
            self._shared_values = None
        else:
            if values.num_rows != c.num_slots or values.dim != self.v_dim:
                raise ValueError(
                    f"value pool is [{values.num_rows}, {values.dim}], the layer needs [{c.num_slots}, {self.v_dim}]"
                )
            self.value_table = None
            # A list hides the shared pool from module registration: its owner saves it once.
            self._shared_values = [values]
        self.reset_parameters()

    @property
    def values(self) -> ValueTableBase:
        return self.value_table if self._shared_values is None else self._shared_values[0]

    def reset_parameters(self) -> None:
        """Initialise every parameter of the layer (the paper's scheme; biases to zero)."""
        if self.keys.is_meta:
            return
        c = self.config
        with torch.no_grad():
            nn.init.xavier_uniform_(self.query_proj.weight)
            if self.query_proj.bias is not None:
                self.query_proj.bias.zero_()
            bound = 1.0 / math.sqrt(c.k_dim)
            self.keys.uniform_(-bound, bound)
            if c.query_layernorm:
                self.query_norm_weight.fill_(1.0)
                self.query_norm_bias.zero_()
            if c.qk_norm:
                self.query_gain.fill_(1.0)
                self.key_gain.fill_(1.0)
            for name in ("swilu_proj", "out_proj", "gate_proj"):
                layer = getattr(self, name, None)
                if layer is not None:
                    layer.weight.normal_(0.0, layer.in_features**-0.5)
                    layer.bias.zero_()
            if self.value_table is not None:
                self.value_table.reset_parameters()

    # -- search -------------------------------------------------------------------------------
    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, dim] -> query halves [tokens, heads, 2, half_dim] in (at least) fp32."""
        c = self.config
        q = self.query_proj(x)
        q = q.to(_score_dtype(q.dtype)).view(-1, c.heads, 1, c.k_dim)
        norm = (self.query_norm_weight, self.query_norm_bias) if c.query_layernorm else (None, None)
        gain = self.query_gain.view(c.heads, c.k_dim) if c.qk_norm else None
        norms = self._norms()
        if c.query_dropout and self.training:  # the dropout sits between the two norms
            if c.query_layernorm:
                q = norms(q, c.heads, 1, 2, *norm)
            q, norm = F.dropout(q, c.query_dropout, True), (None, None)
        if c.query_layernorm or c.qk_norm:
            q = norms(q, c.heads, 1, 2, *norm, gain=gain)
        return q.view(-1, c.heads, 2, self.half_dim)

    def _norms(self):
        """The query and sub-key norms: ``kernels.row_norm`` (one fused C++ pass per row on the
        CPU), or in torch ops with ``backend: torch``."""
        return row_norm_reference if self.config.backend == "torch" else row_norm

    def _subkeys(self) -> torch.Tensor:
        """[heads, 2, n_keys, half_dim] fp32; with qk-norm, scaled so scores are O(1)."""
        keys = self.keys.to(_score_dtype(self.keys.dtype))
        if self.config.qk_norm:
            h, half = self.config.heads, self.half_dim
            gain = self.key_gain.view(2 * h, half)
            keys = self._norms()(keys, 2 * h, self.config.n_keys, 1, gain=gain, scale=1 / math.sqrt(half))
        return keys

    def _half_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of each half against its sub-keys: [tokens, heads, 2, n_keys] fp32."""
        with torch.autocast(x.device.type, enabled=False):
            q = self._queries(x.reshape(-1, self.dim))
            return _half_scores_of(q, self._subkeys())

    def _search(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            return self.select(self._queries(x.reshape(-1, self.dim)), self._subkeys())

    def select(self, q: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The search from query halves ``q`` [tokens, heads, 2, half] and sub-keys ``keys``
        [heads, 2, n_keys, half]: (slots [tokens, heads, knn] int64, their scores), best first.
        The fused search (``kernels.pk_search``): C++ on the CPU, Triton on CUDA (or with
        ``backend: triton``); with ``backend: torch``, or inputs no kernel serves (fp64 on CUDA),
        torch ops over the full half scores."""
        c = self.config
        fused = pk_search(q, keys, c.knn, backend=c.backend) if c.backend != "torch" else None
        if fused is not None:  # tiled scoring, the C++ selection, a backward over the selected keys
            first, second, scores = fused
            return first * c.n_keys + second, scores
        s = _half_scores_of(q, keys)  # [T, H, 2, n_keys]
        k1 = min(c.knn, c.n_keys)
        s1, i1 = s[:, :, 0].topk(k1, dim=-1)  # [T, H, k1]
        s2, i2 = s[:, :, 1].topk(k1, dim=-1)
        candidates = (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # [T, H, k1 * k1]
        scores, pos = candidates.topk(c.knn, dim=-1)  # [T, H, knn]
        rows = i1.gather(-1, pos // k1) * c.n_keys + i2.gather(-1, pos % k1)
        return rows, scores

    def topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Selected slots of ``x`` [..., dim]: (indices [tokens, heads, knn] int64, scores fp32;
        fp64 for an fp64 layer), best first."""
        return self._search(x)

    def score_all(self, x: torch.Tensor) -> torch.Tensor:
        """Brute-force scores of every slot: [tokens, heads, n_keys**2] (slot i*n_keys + j)."""
        s = self._half_scores(x)
        return (s[:, :, 0, :, None] + s[:, :, 1, None, :]).flatten(-2)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        shape = x.shape
        x = x.reshape(-1, self.dim)
        rows, scores = self._search(F.dropout(x, c.input_dropout, self.training))
        weights = F.dropout(torch.softmax(scores, dim=-1), c.value_dropout, self.training)
        num_tokens = x.shape[0]
        rows = rows.view(num_tokens, c.heads * c.knn)  # all heads form one bag
        weights = weights.view(num_tokens, c.heads * c.knn)
        y = self.values(rows, weights, record=self.training and c.track_usage)  # [T, v_dim]
        if c.swilu:
            y = self.out_proj(y.to(x.dtype) * F.silu(self.swilu_proj(x)))
        elif self.v_dim != self.dim:
            y = self.out_proj(y.to(x.dtype))
        if c.gate:
            y = y * torch.sigmoid(self.gate_proj(x))
        return y.to(x.dtype).view(shape)
