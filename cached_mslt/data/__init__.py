"""Data preparation: corpora -> documents -> tokenizer -> packed, statically masked
examples on disk (`prepare_dataset`), and the prepared rows served in store-aligned blocks.

Imports only `cached_mslt.config`, `cached_mslt.rundir` and `storage` (docs/design.md, layout).
"""

from cached_mslt.data.blocks import PreparedBlocks
from cached_mslt.data.corpora import DataError, load_corpus
from cached_mslt.data.masking import SPLIT_IDS, MaskingSpec, mask_batch
from cached_mslt.data.packing import unigram_log_probs
from cached_mslt.data.prepare import (
    PrepareArgs,
    PreparedData,
    check_prepared,
    load_prepared,
    prepare_dataset,
    prepared_manifest,
    summary,
)
from cached_mslt.data.tokenizer import (
    BUNDLED,
    TRAINED,
    TokenizerError,
    check_vocab,
    load_tokenizer,
)

__all__ = [
    "BUNDLED",
    "DataError",
    "MaskingSpec",
    "SPLIT_IDS",
    "PrepareArgs",
    "PreparedBlocks",
    "PreparedData",
    "TRAINED",
    "TokenizerError",
    "check_prepared",
    "check_vocab",
    "load_corpus",
    "load_prepared",
    "load_tokenizer",
    "mask_batch",
    "prepare_dataset",
    "prepared_manifest",
    "summary",
    "unigram_log_probs",
]
