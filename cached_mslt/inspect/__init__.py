"""Inspect cached activations: what the frozen layers compute, stage after stage.

Notebook API (docs/inspect.md):

- `open_store`, `block_ranges`, `iter_blocks`, `read_block`, `iter_rows`, `labelled`:
  read-only access as torch or numpy blocks, one dict per row, or named dims;
- `hidden_stats`: streaming per-dimension mean/std, token norms, dead and outlier
  dimensions, norms by position;
- `similarity`: linear CKA and per-token cosine between stores of the same rows;
- `row_text`, `nearest_rows`: the tokens behind a row, and the rows nearest to it;
- `summarize_store`, `summarize_run`: shapes, size, completeness, fingerprints, validity;
- `probe_run`: BBC topic probe on every stage's frozen bottom;
- `heldout_check`: a checkpoint's MLM loss on held-out prose beside its unigram loss.
"""

from cached_mslt.inspect.api import (
    LabelledArray,
    block_ranges,
    iter_blocks,
    iter_rows,
    labelled,
    open_store,
    read_block,
    single_threaded_compute,
    to_numpy,
)
from cached_mslt.inspect.heldout import HeldoutError, HeldoutResult, heldout_check, heldout_texts
from cached_mslt.inspect.probe import ProbeResult, probe_run
from cached_mslt.inspect.render import format_report
from cached_mslt.inspect.report import InspectError, InspectOptions, gather, to_json
from cached_mslt.inspect.similarity import Similarity, linear_cka, similarity
from cached_mslt.inspect.stats import HiddenStats, StatsAccumulator, hidden_stats
from cached_mslt.inspect.summary import (
    EXIT_CODES,
    StoreSummary,
    logical_bytes,
    summarize_run,
    summarize_store,
)
from cached_mslt.inspect.text import RowText, nearest_rows, row_text

__all__ = [
    "EXIT_CODES",
    "HeldoutError",
    "HeldoutResult",
    "heldout_check",
    "heldout_texts",
    "InspectError",
    "InspectOptions",
    "format_report",
    "gather",
    "logical_bytes",
    "single_threaded_compute",
    "to_json",
    "HiddenStats",
    "LabelledArray",
    "ProbeResult",
    "RowText",
    "Similarity",
    "StatsAccumulator",
    "StoreSummary",
    "block_ranges",
    "hidden_stats",
    "iter_blocks",
    "iter_rows",
    "labelled",
    "linear_cka",
    "nearest_rows",
    "open_store",
    "probe_run",
    "read_block",
    "row_text",
    "similarity",
    "summarize_run",
    "summarize_store",
    "to_numpy",
]
