"""memray: transformer language models with product-key memory layers, at cluster scale.

Not related to the memory profiler published on PyPI under the same import name ``memray``;
this project's distribution is ``memray-layers``.
"""

__version__ = "0.1.0"
