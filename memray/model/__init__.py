"""The model: product-key memory layers, the transformer around them, and the MoE baseline.

No distributed, storage or CLI code lives here.
"""

from .memory import MemoryConfig, ProductKeyMemory
from .moe import MoE, MoEConfig
from .transformer import ModelConfig, Transformer, build_pools, count_parameters, pool_names
from .usage import UsageWindow, touched_usage_metrics, usage_metrics
from .values import LookupStats, TableShard, ValueTable, ValueTableBase

__all__ = [
    "LookupStats",
    "MemoryConfig",
    "ProductKeyMemory",
    "TableShard",
    "ValueTable",
    "ValueTableBase",
    "MoE",
    "MoEConfig",
    "ModelConfig",
    "Transformer",
    "build_pools",
    "count_parameters",
    "pool_names",
    "touched_usage_metrics",
    "usage_metrics",
    "UsageWindow",
]
