"""The model: product-key memory layers, the transformer around them, and the MoE baseline.

No distributed, storage or CLI code lives here.
"""

from .memory import MemoryConfig, ProductKeyMemory, ValueTable
from .moe import MoE, MoEConfig
from .transformer import ModelConfig, Transformer, count_parameters
from .usage import usage_metrics

__all__ = [
    "MemoryConfig",
    "ProductKeyMemory",
    "ValueTable",
    "MoE",
    "MoEConfig",
    "ModelConfig",
    "Transformer",
    "count_parameters",
    "usage_metrics",
]
