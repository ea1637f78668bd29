"""A checkpoint's masked-LM loss on held-out prose, beside the unigram loss of its vocabulary.

The validation split comes from the same corpora as the training text; this check reads
text that is in none of the project's data (docs/data.md, held-out prose: State of the
Union addresses 2001-2021, public domain). The text is packed as `prepare_data` packs
(`[CLS]`, seq_len - 2 tokens, `[SEP]`, documents closed by `[SEP]`) and masked at BERT's
15% with the validation split's rule and a fixed seed, so the check is deterministic. The
reference is the unigram model of the run's training split: every masked token predicted
from its frequency in the text the model trained on, as `unigram_loss` in a prepared
manifest (docs/levers.md).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, BertForMaskedLM

from cached_mslt.data import (
    SPLIT_IDS,
    MaskingSpec,
    load_corpus,
    load_prepared,
    mask_batch,
    unigram_log_probs,
)
from cached_mslt.models import TopModel

# Transcripts mark the audience between sentences: "(Applause.)", "[Laughter]".
STAGE_DIRECTIONS = re.compile(r"[\(\[](?:applause|laughter)[^\)\]]*[\)\]]", re.IGNORECASE)


class HeldoutError(ValueError):
    """The held-out check cannot run as asked; the message says what to fix."""


@dataclass
class HeldoutResult:
    checkpoint: str
    documents: int
    tokens: int
    sequences: int
    masked: int
    loss: float
    unigram_loss: float

    @property
    def below_unigram(self) -> float:
        return 100.0 * (1.0 - self.loss / self.unigram_loss)

    def to_dict(self) -> dict:
        return {**asdict(self), "below_unigram_pct": self.below_unigram}


def heldout_texts(paths: list[str]) -> list[str]:
    """The documents under `paths` (files or folders, as `--corpus` reads them), stage
    directions removed."""
    docs = [STAGE_DIRECTIONS.sub(" ", d) for d in load_corpus(paths).documents]
    docs = [" ".join(d.split()) for d in docs]
    return [d for d in docs if d]


def pack(texts: list[str], tokenizer, seq_len: int) -> np.ndarray:
    """Token ids packed into rows of `seq_len` as `prepare_data` packs them; the tail
    that fills no row is dropped."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids = np.fromiter(
        (t for doc in encoded for t in (*doc, tokenizer.sep_token_id)), dtype=np.int32
    )
    body = seq_len - 2
    if len(ids) < body:
        raise HeldoutError(
            f"the held-out text has {len(ids)} tokens, less than one sequence of {seq_len}; "
            "give more text"
        )
    rows = ids[: len(ids) // body * body].reshape(-1, body)
    edge = np.ones((len(rows), 1), dtype=np.int32)
    return np.hstack([edge * tokenizer.cls_token_id, rows, edge * tokenizer.sep_token_id])


def training_counts(prepared_dir: str | Path, vocab_size: int) -> np.ndarray:
    """Token counts of the training split's first view (every sequence once), read back
    from its masked rows: a masked position's token is its label."""
    prepared = load_prepared(prepared_dir)
    n = prepared.manifest["splits"]["train"]["sequences"]
    counts = np.zeros(vocab_size, dtype=np.int64)
    train = prepared.train.with_format("numpy")
    for start in range(0, n, 4096):
        rows = train[start : min(n, start + 4096)]
        tokens = np.where(rows["labels"] >= 0, rows["labels"], rows["input_ids"])
        counts += np.bincount(tokens.ravel(), minlength=vocab_size)[:vocab_size]
    return counts


@torch.no_grad()
def heldout_check(
    checkpoint: str | Path,
    prepared_dir: str | Path,
    texts: list[str],
    *,
    seq_len: int = 128,
    mask_prob: float = 0.15,
    seed: int = 1234,
    batch_rows: int = 32,
) -> HeldoutResult:
    """The checkpoint's mean loss on every masked token of `texts`, and the unigram loss
    of the same targets under the training split of `prepared_dir` (the run's data)."""
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    if prepared_tokenizer_vocab(prepared_dir) != tokenizer.get_vocab():
        raise HeldoutError(
            f"{prepared_dir} was prepared with another vocabulary than {checkpoint}'s; pass "
            "the --prepared_dir of the run that trained it (its config.json names it)"
        )
    tokens = pack(texts, tokenizer, seq_len)
    spec = MaskingSpec.for_tokenizer(tokenizer, seed, mask_prob)
    masked = mask_batch({"tokens": tokens}, range(len(tokens)), spec, SPLIT_IDS["valid"])
    log_p = unigram_log_probs(training_counts(prepared_dir, len(tokenizer)), spec.special_ids)
    targets = masked["labels"][masked["labels"] >= 0]
    model = BertForMaskedLM.from_pretrained(str(checkpoint)).eval()
    whole = TopModel(model, 0)
    total, count = 0.0, 0
    for start in range(0, len(tokens), batch_rows):
        part = slice(start, start + batch_rows)
        loss, n = whole(
            torch.as_tensor(masked["labels"][part], dtype=torch.long),
            torch.as_tensor(masked["attention_mask"][part]),
            input_ids=torch.as_tensor(masked["input_ids"][part], dtype=torch.long),
        )
        total, count = total + float(loss) * n, count + n
    return HeldoutResult(
        checkpoint=str(checkpoint),
        documents=len(texts),
        tokens=int(tokens.size),
        sequences=len(tokens),
        masked=count,
        loss=total / count,
        unigram_loss=float(-log_p[targets].mean()),
    )


def prepared_tokenizer_vocab(prepared_dir: str | Path) -> dict[str, int]:
    return load_prepared(prepared_dir).tokenizer().get_vocab()
