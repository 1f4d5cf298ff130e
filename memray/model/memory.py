"""Product-key memory layer (Lample et al. 2019) with the Memory+ changes of Berges et al. 2024.

``ProductKeyMemory`` is the specification of the layer: sharded value tables only change where
the values live and must reproduce it numerically. A layer reads its values from a
:class:`ValueTable`; several layers may share one table (a named *pool*), which then lives with
the model rather than with any one layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from memray.errors import ConfigError
from memray.kernels import embedding_bag


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
    qk_norm: bool = False  # RMS-norm query halves and sub-keys (learnable gains)
    query_layernorm: bool = False  # LayerNorm of each head's query before the split
    query_bias: bool = True
    input_dropout: float = 0.0
    query_dropout: float = 0.0
    value_dropout: float = 0.0  # dropout on the softmax weights of the selected slots
    value_init_std: float | None = None  # None: v_dim ** -0.5
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


class ValueTable(nn.Module):
    """A value pool: ``weight`` [num_rows, dim] read as weighted bags of rows.

    The interface a sharded table implements too: ``forward(indices, weights)`` returns the bags,
    ``record_usage`` accumulates per-slot statistics, ``usage_count``/``usage_mass`` hold them.
    The gradient of ``weight`` is row-sparse (a sparse COO tensor holding only the rows read)
    when ``sparse_grad``; autograd accumulation may leave it uncoalesced.
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        *,
        init_std: float | None = None,
        sparse_grad: bool = True,
        backend: str = "auto",
        lr: float | None = None,
        weight_decay: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.num_rows = num_rows
        self.dim = dim
        self.init_std = dim**-0.5 if init_std is None else init_std
        self.sparse_grad = sparse_grad
        self.backend = backend
        self.lr = lr
        self.weight_decay = weight_decay
        self.weight = nn.Parameter(torch.empty(num_rows, dim, device=device, dtype=dtype))
        # Cumulative since the table was created; saved with the weights.
        self.register_buffer("usage_count", torch.empty(num_rows, dtype=torch.int64, device=device))
        self.register_buffer("usage_mass", torch.empty(num_rows, dtype=torch.float32, device=device))
        self.init_seed = draw_init_seed()  # drawn once: re-initialising gives the same table
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        with torch.no_grad():
            init_value_rows(self.weight, self.init_seed, self.init_std)
            self.usage_count.zero_()
            self.usage_mass.zero_()

    def forward(self, indices: torch.Tensor, weights: torch.Tensor, *, record: bool = False) -> torch.Tensor:
        """``indices``/``weights`` [tokens, lookups] -> bags [tokens, dim] (fp32 accumulation).

        ``record``: add these lookups to the usage statistics (``record_usage``)."""
        if record:
            self.record_usage(indices, weights.detach())
        return embedding_bag(indices, weights, self.weight, sparse_grad=self.sparse_grad, backend=self.backend)

    @torch.no_grad()
    def record_usage(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        flat = indices.reshape(-1)
        self.usage_count.index_add_(0, flat, torch.ones_like(flat))
        self.usage_mass.index_add_(0, flat, weights.reshape(-1).to(self.usage_mass.dtype))

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim}, sparse_grad={self.sparse_grad}"


INIT_BLOCK_ROWS = 1 << 16


@torch.no_grad()
def init_value_rows(
    out: torch.Tensor,
    seed: int,
    std: float,
    shape: tuple[int, int] | None = None,
    row_start: int = 0,
    col_start: int = 0,
) -> None:
    """Fill ``out`` with its part (rows from ``row_start``, columns from ``col_start``) of a
    ``shape`` table (default: ``out``'s) drawn from N(0, std).

    The table is drawn in blocks of ``INIT_BLOCK_ROWS`` rows, block ``b`` whole (torch's normal
    sampler depends on the tensor size) from a generator seeded with ``seed + b``, so a shard (a
    row range, a column slice) is generated alone and equals the same part of the whole table:
    a sharded pool starts exactly as an unsharded one.
    """
    num_rows, dim = out.shape if shape is None else shape
    rows, cols = out.shape
    if rows == 0:
        return
    generator = torch.Generator()
    for block in range(row_start // INIT_BLOCK_ROWS, (row_start + rows - 1) // INIT_BLOCK_ROWS + 1):
        first = block * INIT_BLOCK_ROWS
        lo, hi = max(first, row_start), min(first + INIT_BLOCK_ROWS, row_start + rows)
        generator.manual_seed(seed + block)
        values = torch.empty(min(INIT_BLOCK_ROWS, num_rows - first), dim).normal_(0.0, std, generator=generator)
        out[lo - row_start : hi - row_start].copy_(values[lo - first : hi - first, col_start : col_start + cols])


def draw_init_seed() -> int:
    """One draw from torch's global generator: the seed of a value table's initialisation."""
    return int(torch.randint(0, 2**62, (), device="cpu").item())


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and softmax run in fp32 at least (fp64 layers stay fp64, for reference checks)."""
    return torch.promote_types(dtype, torch.float32)


def _rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class ProductKeyMemory(nn.Module):
    """A memory layer: ``forward(x[..., dim]) -> [..., dim]``.

    For each head, the query splits into halves scored against two sub-key tables of
    ``n_keys`` keys; the top-``knn`` of the ``knn**2`` sums of per-half top-``knn`` scores are
    exactly the top-``knn`` of all ``n_keys**2`` slots (slot ``i * n_keys + j``). All heads'
    slots form one bag, weighted by a softmax (fp32) over each head's selected scores.

    ``values``: a shared :class:`ValueTable` (a pool owned elsewhere, e.g. by the model); when
    omitted the layer creates and owns its own table.
    """

    def __init__(self, dim: int, config: MemoryConfig, values: ValueTable | None = None, *, device=None):
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
            self.value_table = ValueTable(
                c.num_slots,
                self.v_dim,
                init_std=c.value_init_std,
                backend=c.backend,
                lr=c.value_lr,
                weight_decay=c.value_weight_decay,
                device=device,
            )
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
    def values(self) -> ValueTable:
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
        q = q.to(_score_dtype(q.dtype)).view(-1, c.heads, c.k_dim)
        if c.query_layernorm:
            q = F.layer_norm(q, (c.k_dim,)) * self.query_norm_weight + self.query_norm_bias
        q = F.dropout(q, c.query_dropout, self.training)
        q = q.view(-1, c.heads, 2, self.half_dim)
        if c.qk_norm:
            q = _rms_normalize(q) * self.query_gain
        return q

    def _subkeys(self) -> torch.Tensor:
        """[heads, 2, n_keys, half_dim] fp32; with qk-norm, scaled so scores are O(1)."""
        keys = self.keys.to(_score_dtype(self.keys.dtype))
        if self.config.qk_norm:
            keys = _rms_normalize(keys) * self.key_gain[:, :, None, :] / math.sqrt(self.half_dim)
        return keys

    def _half_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of each half against its sub-keys: [tokens, heads, 2, n_keys] fp32."""
        with torch.autocast(x.device.type, enabled=False):
            q = self._queries(x.reshape(-1, self.dim))
            return torch.einsum("thsd,hsnd->thsn", q, self._subkeys())

    def _search(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        s = self._half_scores(x)  # [T, H, 2, n_keys]
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
    def forward(self, x: torch.Tensor, values: ValueTable | None = None) -> torch.Tensor:
        """``values`` overrides the layer's table (e.g. a sharded pool with the same interface)."""
        c = self.config
        shape = x.shape
        x = x.reshape(-1, self.dim)
        rows, scores = self._search(F.dropout(x, c.input_dropout, self.training))
        weights = F.dropout(torch.softmax(scores, dim=-1), c.value_dropout, self.training)
        table = self.values if values is None else values
        num_tokens = x.shape[0]
        rows = rows.view(num_tokens, c.heads * c.knn)  # all heads form one bag
        weights = weights.view(num_tokens, c.heads * c.knn)
        y = table(rows, weights, record=self.training and c.track_usage)  # [T, v_dim]
        if c.swilu:
            y = self.out_proj(y.to(x.dtype) * F.silu(self.swilu_proj(x)))
        elif self.v_dim != self.dim:
            y = self.out_proj(y.to(x.dtype))
        if c.gate:
            y = y * torch.sigmoid(self.gate_proj(x))
        return y.to(x.dtype).view(shape)
