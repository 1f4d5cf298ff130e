"""Kernels for product-key memory layers: the weighted value lookup ("embedding bag") and the
product-key search (``pk_search``: tiled scoring, selection and a sparse backward; ``pk_select``:
the selection alone), and the layer's query and sub-key norms fused (``row_norm``).

Each token (a bag) reads a few rows of a large value table and sums them with its key-match
weights, ``out[b] = sum_e w[e] * table[idx[e]]``. The table gradient touches only the rows that
were read, so it is returned as a coalesced sparse tensor instead of a dense ``[N, D]`` one.

This package imports only torch (and triton, lazily, when the Triton backend runs), so it can
be used and tested without the rest of ``memray``.
"""

from ._alloc import empty_huge_pages
from .embedding_bag import bag_backward, bag_forward, embedding_bag
from .pk_search import pk_search, pk_select, pk_select_reference
from .reference import embedding_bag_reference
from .row_norm import row_norm, row_norm_reference
from .row_update import BackwardRowUpdate, lazy_adam_, rowwise_adagrad_, sgd_

__all__ = [
    "BackwardRowUpdate",
    "embedding_bag",
    "empty_huge_pages",
    "embedding_bag_reference",
    "pk_search",
    "pk_select",
    "pk_select_reference",
    "bag_forward",
    "bag_backward",
    "lazy_adam_",
    "row_norm",
    "row_norm_reference",
    "rowwise_adagrad_",
    "sgd_",
]
