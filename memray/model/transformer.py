"""Decoder-only transformer whose FFN is, per block, a SwiGLU, a product-key memory or an MoE.

Value pools belong to the model, not to the memory layers, so several layers can share one pool
and a pool is saved once. :func:`build_pools` is the one place pools are built; a caller may build
them (e.g. sharded tables kept out of a DeepSpeed engine) and give them to the model, which then
uses them without registering them as its parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from memray.errors import ConfigError

from .layers import Attention, KVCache, LayerCache, RMSNorm, Rotary, SwiGLU
from .lora import LoRALinear, adapted
from .memory import MemoryConfig, ProductKeyMemory
from .moe import MoE, MoEConfig
from .values import ValueTable, ValueTableBase


@dataclass(kw_only=True)
class ModelConfig:
    vocab_size: int = 259
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int | None = None  # None: 8/3 * dim rounded up to a multiple of 32
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.02
    tie_embeddings: bool = True
    ffn: Literal["swiglu", "moe"] = "swiglu"  # the FFN of blocks without a memory layer
    memory_layers: list[int] = field(default_factory=list)  # block indices whose FFN is a memory
    # pool name -> memory layers reading it; memory layers not listed get a pool of their own
    memory_pools: dict[str, list[int]] = field(default_factory=dict)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    # low-rank adapters on every attention projection (qkv, proj) and SwiGLU projection (gate,
    # up, down); 0: none. `memray finetune --mode lora` sets it (memray.model.lora)
    lora_rank: int = 0
    lora_alpha: float = 16.0

    def __post_init__(self):
        if self.lora_rank < 0:
            raise ConfigError("lora_rank", f"must be >= 0, got {self.lora_rank}")
        if self.lora_alpha <= 0:
            raise ConfigError("lora_alpha", f"must be > 0, got {self.lora_alpha}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ConfigError("n_heads", f"{self.n_heads} does not divide dim={self.dim}")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError("n_heads", f"head dim {self.dim // self.n_heads} must be even for rotary embeddings")
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            raise ConfigError("ffn_hidden", f"must be >= 1, got {self.ffn_hidden}")
        for i in self.memory_layers:
            if not 0 <= i < self.n_layers:
                raise ConfigError("memory_layers", f"block index {i} is out of range for n_layers={self.n_layers}")
        if len(set(self.memory_layers)) != len(self.memory_layers):
            raise ConfigError("memory_layers", f"repeated block index in {self.memory_layers}")
        seen: dict[int, str] = {}
        for pool, layers in self.memory_pools.items():
            if not layers:
                raise ConfigError(f"memory_pools.{pool}", "lists no layers")
            for i in layers:
                if i not in self.memory_layers:
                    raise ConfigError(f"memory_pools.{pool}", f"block {i} is not in memory_layers {self.memory_layers}")
                if i in seen:
                    raise ConfigError(f"memory_pools.{pool}", f"block {i} already reads pool '{seen[i]}'")
                seen[i] = pool

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 32 * math.ceil(8 * self.dim / 3 / 32)

    def pool_of(self) -> dict[int, str]:
        """Memory block index -> name of the pool it reads."""
        owner = {i: name for name, layers in self.memory_pools.items() for i in layers}
        return {i: owner.get(i, f"layer{i}") for i in self.memory_layers}


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int, pool: ValueTableBase | None, device=None):
        super().__init__()
        c = config
        self.attn_norm = RMSNorm(c.dim, c.norm_eps, device=device)
        self.attn = Attention(c.dim, c.n_heads, c.max_seq_len, c.rope_theta, c.dropout, device=device)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps, device=device)
        self.pool_name = None
        if pool is not None:
            self.ffn = ProductKeyMemory(c.dim, c.memory, values=pool, device=device)
            self.pool_name = config.pool_of()[index]
        elif c.ffn == "moe":
            self.ffn = MoE(c.dim, c.moe.hidden or c.hidden, c.moe, device=device)
        else:
            self.ffn = SwiGLU(c.dim, c.hidden, device=device)
        if c.lora_rank:
            targets = [(self.attn, "qkv"), (self.attn, "proj")]
            if isinstance(self.ffn, SwiGLU):
                targets += [(self.ffn, "gate"), (self.ffn, "up"), (self.ffn, "down")]
            for module, name in targets:
                setattr(module, name, adapted(getattr(module, name), c.lora_rank, c.lora_alpha))

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache)
        return x + self.ffn(self.ffn_norm(x))


def pool_names(config: ModelConfig) -> list[str]:
    """The model's value pools, in the order they are built (and their init seeds drawn)."""
    return list(dict.fromkeys(config.pool_of().values()))


def build_pools(
    config: ModelConfig, table_cls: type[ValueTableBase] = ValueTable, **options
) -> dict[str, ValueTableBase]:
    """Every value pool of ``config``, in :func:`pool_names` order, as ``table_cls`` tables
    (``options``: what that class takes besides the memory config, e.g. a process group)."""
    return {name: table_cls.from_config(config.memory, config.dim, **options) for name in pool_names(config)}


class Transformer(nn.Module):
    """``pools``: value tables built by the caller (:func:`build_pools`, e.g. sharded ones), one
    per name of :func:`pool_names`. The memory layers read them, but they are not registered as
    submodules, so they are not in ``parameters()`` or ``state_dict()``: the caller trains and
    saves them. Without ``pools`` the model builds unsharded ones and owns them (``pools.*``)."""

    def __init__(self, config: ModelConfig, device=None, pools: Mapping[str, ValueTableBase] | None = None):
        super().__init__()
        c = config
        self.config = c
        if pools is None:
            self.pools = nn.ModuleDict(build_pools(c, device=device))
        else:
            missing = [name for name in pool_names(c) if name not in pools]
            if missing:
                raise ValueError(f"pools {missing} are missing from the pools given to the model")
            self.pools = dict(pools)  # a plain dict: not registered
        tables = self.value_tables()
        pool_of = c.pool_of()
        self.embed = nn.Embedding(c.vocab_size, c.dim, device=device)
        self.blocks = nn.ModuleList(
            Block(c, i, tables[pool_of[i]] if i in pool_of else None, device=device) for i in range(c.n_layers)
        )
        self.norm = RMSNorm(c.dim, c.norm_eps, device=device)
        self.head = None if c.tie_embeddings else nn.Linear(c.dim, c.vocab_size, bias=False, device=device)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter and derived buffer, e.g. after ``to_empty`` from meta."""
        c = self.config
        if self.embed.weight.is_meta:
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, c.init_std)
                if module.bias is not None:
                    module.bias.zero_()
        self.embed.weight.normal_(0.0, c.init_std)
        # residual output projections: scaled down with depth (GPT-2)
        for block in self.blocks:
            block.attn.proj.weight.normal_(0.0, c.init_std / math.sqrt(2 * c.n_layers))
            if isinstance(block.ffn, SwiGLU):
                block.ffn.down.weight.normal_(0.0, c.init_std / math.sqrt(2 * c.n_layers))
        # components with their own schemes (memory layers: the paper's) run last and win; pools
        # given from outside were initialised by their owner
        for module in self.modules():
            if isinstance(module, (RMSNorm, Rotary, ProductKeyMemory, MoE, ValueTableBase)):
                module.reset_parameters()
            elif isinstance(module, LoRALinear):
                module.reset_lora()

    def value_tables(self) -> dict[str, ValueTableBase]:
        """Pool name -> value table, whether the model owns the pools or was given them."""
        return dict(self.pools.items())

    def memory_layers(self) -> list[ProductKeyMemory]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, ProductKeyMemory)]

    def named_dense_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every trainable parameter except the value pools."""
        pool_params = {id(t.weight) for t in self.pools.values()}
        return [(n, p) for n, p in self.named_parameters() if id(p) not in pool_params]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter except the value pools."""
        return [p for _, p in self.named_dense_parameters()]

    def aux_loss(self) -> torch.Tensor:
        losses = [b.ffn.aux_loss * b.ffn.config.aux_loss_coef for b in self.blocks if isinstance(b.ffn, MoE)]
        return sum(losses) if losses else torch.zeros((), device=self.embed.weight.device)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences of up to ``max_len`` tokens (default
        ``max_seq_len``), on the model's device and in its dtype."""
        c, weight = self.config, self.embed.weight
        length = min(max_len or c.max_seq_len, c.max_seq_len)
        return KVCache(
            len(self.blocks), batch, c.n_heads, c.dim // c.n_heads, length, device=weight.device, dtype=weight.dtype
        )

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """tokens [batch, seq] -> logits [batch, seq, vocab] (fp32; fp64 for an fp64 model).

        With ``cache`` (:meth:`new_cache`), ``tokens`` continue the sequences the cache holds:
        only they run through the model, attending to the cached keys and values, and the cache
        then holds them too."""
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length += tokens.shape[1]
        x = self.norm(x)
        logits = x @ self.embed.weight.t() if self.head is None else self.head(x)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


def count_parameters(model: Transformer) -> dict[str, int]:
    """Parameters of the whole model; a sharded pool counts its full size (``num_rows * dim``)."""
    memory = sum(t.num_rows * t.dim for t in model.value_tables().values())
    dense = sum(p.numel() for p in model.dense_parameters())
    return {"total": dense + memory, "memory": memory, "dense": dense}
