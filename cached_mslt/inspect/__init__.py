"""Inspect cached activations: what the frozen layers compute, stage after stage.

Notebook API (docs/inspect.md):

- `open_store`, `block_ranges`, `iter_blocks`, `read_block`, `iter_rows`, `labelled`:
  read-only access as torch or numpy blocks, one dict per row, or named dims;
- `hidden_stats`: streaming per-dimension mean/std, token norms, dead and outlier
  dimensions, norms by position;
- `similarity`: linear CKA and per-token cosine between stores of the same rows.
"""

from cached_mslt.inspect.api import (
    LabelledArray,
    block_ranges,
    iter_blocks,
    iter_rows,
    labelled,
    open_store,
    read_block,
    to_numpy,
)
from cached_mslt.inspect.similarity import Similarity, linear_cka, similarity
from cached_mslt.inspect.stats import HiddenStats, StatsAccumulator, hidden_stats

__all__ = [
    "HiddenStats",
    "LabelledArray",
    "Similarity",
    "StatsAccumulator",
    "block_ranges",
    "hidden_stats",
    "iter_blocks",
    "iter_rows",
    "labelled",
    "linear_cka",
    "open_store",
    "read_block",
    "similarity",
    "to_numpy",
]
