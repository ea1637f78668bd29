"""Offline data preparation: text corpora -> packed, statically masked MLM examples on disk.

read -> clean -> deduplicate -> split by document -> (fit a WordPiece vocabulary to the
training split) -> tokenize -> pack -> K masked views -> `save_to_disk`, all
deterministic, so the output is a function of the fingerprint (documents, tokenizer
vocabulary and settings). The fingerprint is computed before the
heavy work: a re-run with the same fingerprint reuses the existing directory.

On disk, `prepared_dir/` holds `train/` and `valid/` (datasets saved with
`save_to_disk`), `tokenizer/` (the tokenizer the ids belong to, trained or bundled: every
checkpoint of a run is saved with it) and `manifest.json`, written last. The manifest
records the unigram loss of the validation targets (`unigram_loss`): the loss of a model
that knows token frequencies and nothing else, the reference every validation loss is
shown beside. Everything is built in a hidden
temporary directory next to the target and renamed into place when whole, so a crash
never leaves a directory that looks complete.

Each split's columns: `input_ids` (int32, masked), `labels` (int32, -100 where not
masked), `attention_mask` (int8, all ones: packing leaves no padding), `sequence` and
`view` (int32). Example i is view `i // num_sequences` of packed sequence
`i % num_sequences`, so all of view 0 comes first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, Features, List, Value, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from cached_mslt.config import ConfigError, DataArgs, RunArgs
from cached_mslt.corpora import Corpus, DataError, load_corpus
from cached_mslt.masking import MaskingSpec, apply_static_masking
from cached_mslt.tokenizer import TRAINED, check_vocab, load_tokenizer, train_wordpiece

logger = logging.getLogger(__name__)

# Bump when the pipeline's output changes for the same inputs: old directories then
# stop matching instead of being silently reused.
FORMAT_VERSION = 2  # 2: tokenizer/ saved beside the splits, unigram_loss in the manifest
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "valid")


@dataclass
class PrepareArgs:
    overwrite: bool = field(
        default=False, metadata={"help": "replace a prepared_dir that holds different data"}
    )


@dataclass
class PreparedData:
    train: Dataset  # torch format
    valid: Dataset  # torch format
    manifest: dict[str, Any]
    path: Path

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer these ids belong to (saved with the data)."""
        return load_tokenizer(str(self.path / TOKENIZER_DIR))


def clean_documents(texts: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    """Normalise whitespace, drop empty documents and exact duplicates (first one kept)."""
    kept: list[str] = []
    seen: set[bytes] = set()
    counts = {"empty_dropped": 0, "duplicates_dropped": 0}
    for text in tqdm(texts, desc="Cleaning", unit=" docs"):
        text = " ".join(text.split())
        if not text:
            counts["empty_dropped"] += 1
            continue
        key = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if key in seen:
            counts["duplicates_dropped"] += 1
            continue
        seen.add(key)
        kept.append(text)
    return kept, counts


def split_documents(
    texts: list[str], valid_fraction: float, split_seed: int
) -> dict[str, list[str]]:
    """Split by document on a seeded hash of its text, so packing never crosses the split.

    Documents are ordered by that hash too: a deterministic shuffle, independent of input
    order, that mixes the sources so a windowed shuffle downstream still sees all of them.
    The documents hashing below `valid_fraction` go to validation (at least one).
    """
    if len(texts) < 2:
        raise DataError(
            f"the corpus has {len(texts)} document(s) after cleaning; a train/validation "
            "split needs at least 2: add text to --corpus"
        )

    def position(text: str) -> float:
        digest = hashlib.blake2b(f"{split_seed}\0{text}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    ranked = sorted((position(t), t) for t in texts)
    n_valid = min(len(texts) - 1, max(1, sum(p < valid_fraction for p, _ in ranked)))
    return {"train": [t for _, t in ranked[n_valid:]], "valid": [t for _, t in ranked[:n_valid]]}


def _example_settings(data: DataArgs) -> dict[str, Any]:
    """The options the prepared examples depend on: fingerprinted, and kept in the manifest."""
    return {
        "seq_len": data.seq_len,
        "mask_prob": data.mask_prob,
        "valid_mask_prob": data.valid_mask_prob,
        "mask_seed": data.mask_seed,
        "views": data.views,
        "split_seed": data.split_seed,
        "valid_fraction": data.valid_fraction,
    }


def corpus_tokenizer(data: DataArgs, splits: dict[str, list[str]]) -> PreTrainedTokenizerBase:
    """The tokenizer the data is prepared with: a WordPiece vocabulary fitted to the
    training split (`--tokenizer train`; validation text never shapes the vocabulary), or
    the bundled / a local one, checked against `--vocab_size` when that is given."""
    if data.tokenizer == TRAINED:
        return train_wordpiece(splits["train"], data.vocab_size, data.vocab_min_frequency)
    tokenizer = load_tokenizer(data.tokenizer)
    if data.vocab_size is not None:
        check_vocab(tokenizer, data.vocab_size, source="model config (--vocab_size)")
    return tokenizer


def unigram_loss(train: Dataset, valid: Dataset, vocab_size: int, special_ids: list[int]) -> float:
    """Cross-entropy (nats) on the validation targets of a model that predicts every masked
    token from the training split's token frequencies alone (add-one smoothed, special
    tokens excluded): the level a model reaches by counting words. A loss is only
    meaningful beside it. Reads both splits in batches (no split is held in memory)."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for batch in train.with_format("numpy").iter(batch_size=4096):
        first_view = batch["view"] == 0  # every view holds the same tokens
        labels, ids = batch["labels"][first_view], batch["input_ids"][first_view]
        original = np.where(labels >= 0, labels, ids)  # masking changed only labelled places
        counts += np.bincount(original.ravel(), minlength=vocab_size)
    counts[special_ids] = 0
    log_p = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    total, n = 0.0, 0
    for batch in valid.with_format("numpy").iter(batch_size=4096):
        targets = batch["labels"][batch["labels"] >= 0]
        total, n = total - log_p[targets].sum(), n + targets.size
    return total / max(n, 1)


def data_fingerprint(
    splits: dict[str, list[str]], tokenizer: PreTrainedTokenizerBase, data: DataArgs
) -> str:
    """sha256 over everything the prepared examples depend on (not num_proc: it must not matter)."""
    h = hashlib.sha256()
    settings = {
        "format_version": FORMAT_VERSION,
        **_example_settings(data),
        "tokenizer_class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for split in SPLITS:
        h.update(f"\0{split}\0{len(splits[split])}".encode())
        for text in splits[split]:
            raw = text.encode()
            h.update(len(raw).to_bytes(8, "little") + raw)  # length prefix: no ambiguous joins
    return h.hexdigest()


def group_texts(
    examples: dict[str, list[Any]], seq_len: int, cls_id: int, sep_id: int
) -> dict[str, np.ndarray]:
    """Pack documents, each closed by [SEP], into `[CLS] t1..t_{seq_len-2} [SEP]` blocks.

    run_mlm's idiom, but called on a whole split as one batch (`batch_size=None`): per
    1000-document batch, as run_mlm does, would drop a partial block per batch; here only
    the final partial block is dropped.
    """
    stream = np.fromiter(
        chain.from_iterable((*ids, sep_id) for ids in examples["input_ids"]), dtype=np.int32
    )
    body = seq_len - 2
    blocks = stream[: len(stream) // body * body].reshape(-1, body)
    edge = np.ones((len(blocks), 1), dtype=np.int32)
    return {"tokens": np.hstack([edge * cls_id, blocks, edge * sep_id])}


def _tokenize(batch: dict[str, list[str]], tokenizer: PreTrainedTokenizerBase) -> dict[str, list]:
    ids = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False)[
        "input_ids"
    ]
    return {"input_ids": ids, "length": [len(x) for x in ids]}


def _build_split(
    split: str, texts: list[str], tokenizer: PreTrainedTokenizerBase, data: DataArgs
) -> tuple[Dataset, dict[str, int]]:
    docs = Dataset.from_dict({"text": texts})
    tokenized = docs.map(
        _tokenize,
        batched=True,
        num_proc=min(data.num_proc, len(docs)),
        remove_columns=["text"],
        fn_kwargs={"tokenizer": tokenizer},
        desc=f"Tokenizing {split}",
    )
    tokens = sum(tokenized["length"])
    packed = tokenized.map(
        group_texts,
        batched=True,
        batch_size=None,  # the whole split: see group_texts
        remove_columns=tokenized.column_names,
        features=Features({"tokens": List(Value("int32"), length=data.seq_len)}),
        fn_kwargs={
            "seq_len": data.seq_len,
            "cls_id": tokenizer.cls_token_id,
            "sep_id": tokenizer.sep_token_id,
        },
        desc=f"Packing {split}",
    )
    n = len(packed)
    if n == 0:
        raise DataError(
            f"the {split} split has {tokens} tokens, less than one sequence of seq_len="
            f"{data.seq_len}; add text to --corpus or {'raise' if split == 'valid' else 'lower'} "
            "--valid_fraction"
        )
    views = concatenate_datasets([packed] * data.views)
    views = views.add_column("sequence", np.tile(np.arange(n, dtype=np.int32), data.views))
    views = views.add_column("view", np.repeat(np.arange(data.views, dtype=np.int32), n))
    # Validation is masked at its own rate (BERT's 15% by default), so losses stay
    # comparable between runs that train at different masking rates.
    rate = data.mask_prob if split == "train" else data.valid_mask_prob
    spec = MaskingSpec.for_tokenizer(tokenizer, data.mask_seed, rate)
    masked = apply_static_masking(views, spec, split, num_proc=min(data.num_proc, len(views)))
    counts = {
        "documents": len(texts),
        "tokens": tokens,
        "sequences": n,
        "examples": len(masked),
        # The stream is tokens plus one [SEP] per document; this tail did not fill a block.
        "remainder_tokens": tokens + len(texts) - n * (data.seq_len - 2),
    }
    return masked, counts


def prepare_dataset(args: RunArgs, overwrite: bool = False) -> Path:
    """Prepare `args.data.corpus` into `args.data.prepared_dir` (or reuse it); return the path."""
    data = args.data
    if not 0.0 < data.valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction must be in (0, 1), got {data.valid_fraction}")
    if data.views < 1:
        raise ConfigError(f"views must be at least 1, got {data.views}")
    corpus = load_corpus(
        data.corpus,
        text_column=data.text_column,
        strict=data.strict,
        max_documents=data.max_documents,
    )
    texts, dropped = clean_documents(corpus.documents)
    if not texts and corpus.undecodable_lines:
        raise DataError(
            f"no text left in {[s['source'] for s in corpus.sources]}: "
            f"{corpus.undecodable_lines} lines were skipped as not valid UTF-8; expected "
            f"UTF-8 text. Re-encode the corpus (e.g. `iconv -f latin1 -t utf-8`), or rerun with "
            f"--strict to see the first undecodable file and byte offset"
        )
    if not texts:
        raise DataError(
            f"no text left after cleaning {[s['source'] for s in corpus.sources]} "
            f"({len(corpus.documents)} documents read, all empty or duplicates); check --corpus "
            f"and --text_column"
        )
    splits = split_documents(texts, data.valid_fraction, data.split_seed)
    tokenizer = corpus_tokenizer(data, splits)
    fingerprint = data_fingerprint(splits, tokenizer, data)

    target = Path(data.prepared_dir)
    if _reuse_or_refuse(target, fingerprint, overwrite):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        split_counts, built = {}, {}
        for split in SPLITS:
            built[split], split_counts[split] = _build_split(split, splits[split], tokenizer, data)
            built[split].save_to_disk(str(staging / split))
        tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        unigram = unigram_loss(
            built["train"], built["valid"], len(tokenizer), tokenizer.all_special_ids
        )
        manifest = _manifest(fingerprint, corpus, dropped, split_counts, tokenizer, data)
        manifest["unigram_loss"] = unigram
        # The manifest is written last: its presence marks the directory as complete.
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %s", target)
    return target


def _manifest(
    fingerprint: str,
    corpus: Corpus,
    dropped: dict[str, int],
    split_counts: dict[str, dict[str, int]],
    tokenizer: PreTrainedTokenizerBase,
    data: DataArgs,
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "sources": corpus.sources,
        "documents": {
            "read": len(corpus.documents),
            **dropped,
            "undecodable_lines_skipped": corpus.undecodable_lines,
            "kept": sum(c["documents"] for c in split_counts.values()),
        },
        "splits": split_counts,
        **_example_settings(data),
        "tokenizer": data.tokenizer,  # its source; the tokenizer itself is in tokenizer/
        "vocab_size": len(tokenizer),
        "special_token_ids": {
            name: getattr(tokenizer, f"{name}_token_id")
            for name in ("pad", "unk", "cls", "sep", "mask")
        },
        "columns": {
            "input_ids": "int32",
            "labels": "int32",
            "attention_mask": "int8",
            "sequence": "int32",
            "view": "int32",
        },
    }


def prepared_manifest(path: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _reuse_or_refuse(target: Path, fingerprint: str, overwrite: bool) -> bool:
    """True if `target` already holds this data; raise if it holds other data (unless overwrite)."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return False
    manifest = prepared_manifest(target) if target.is_dir() else None
    if manifest and manifest.get("fingerprint") == fingerprint:
        logger.info(
            "reusing %s: it holds this data already (fingerprint %s)", target, fingerprint[:12]
        )
        return True
    if overwrite:
        logger.warning("replacing %s (--overwrite)", target)
        return False
    found = (
        f"a different prepared dataset (fingerprint {manifest.get('fingerprint', '?')[:12]}, "
        f"this corpus and settings give {fingerprint[:12]})"
        if manifest
        else "something that is not a complete prepared dataset"
    )
    raise DataError(
        f"{target} already holds {found}; pass --overwrite to replace it, or choose another "
        "--prepared_dir"
    )


def _publish(staging: Path, target: Path) -> None:
    """Move the finished directory into place; an old target is moved aside, then deleted."""
    if not target.exists():
        staging.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(old)
    staging.rename(target)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


# What an example is (its length, masking and token ids): a run configured otherwise than
# its prepared data would silently train on something else. (Split seed and validation share
# only choose which documents validate; they are left to the data's own fingerprint.)
SHAPING = ("seq_len", "mask_prob", "valid_mask_prob", "mask_seed", "views", "tokenizer")


def check_settings(path: Path, manifest: dict[str, Any], data: DataArgs) -> None:
    """Refuse, before any work, a run whose data settings differ from what was prepared."""

    def same(name: str) -> bool:
        want, have = getattr(data, name), manifest.get(name)
        if name == "tokenizer" and want not in ("train", "bundled") and have is not None:
            return Path(want).resolve() == Path(have).resolve()
        return want == have

    diffs = [n for n in SHAPING if not same(n)]
    if diffs:
        found = ", ".join(
            f"--{n} {manifest.get(n)!r} (run asks {getattr(data, n)!r})" for n in diffs
        )
        flags = " ".join(f"--{n} {getattr(data, n)}" for n in diffs)
        raise DataError(
            f"{path} was prepared with {found}; expected the run's settings. Prepare data with "
            f"them: `python pipelines/prepare_data.py --prepared_dir <new dir> {flags}` and pass "
            f"that --prepared_dir, or run with the prepared values"
        )


def check_prepared(data: DataArgs) -> None:
    """`check_settings` from the manifest alone: cheap enough to run before anything else."""
    manifest = prepared_manifest(data.prepared_dir)
    if manifest is not None:
        check_settings(Path(data.prepared_dir), manifest, data)


def load_prepared(prepared_dir: str | Path, expected: DataArgs | None = None) -> PreparedData:
    """Open a prepared directory: both splits in torch format, plus its manifest. With
    `expected`, refuse data prepared with other example settings (`check_settings`)."""
    path = Path(prepared_dir)
    manifest = prepared_manifest(path)
    if manifest is None:
        raise DataError(
            f"{path} is not a complete prepared dataset (no readable {MANIFEST}); run "
            f"`python pipelines/prepare_data.py --prepared_dir {path}`"
        )
    if expected is not None:
        check_settings(path, manifest, expected)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path} was prepared by format version {manifest.get('format_version')}, this code "
            f"reads {FORMAT_VERSION}; re-run prepare_data.py with --overwrite"
        )
    train, valid = (load_from_disk(str(path / split)).with_format("torch") for split in SPLITS)
    return PreparedData(train=train, valid=valid, manifest=manifest, path=path)


def summary(path: Path, manifest: dict[str, Any]) -> str:
    """A few lines for people: what was read, what was written, where."""
    docs = manifest["documents"]
    lines = [
        f"prepared data: {path}  (fingerprint {manifest['fingerprint'][:12]})",
        f"  documents: {docs['read']} read, {docs['empty_dropped']} empty, "
        f"{docs['duplicates_dropped']} duplicates, {docs['undecodable_lines_skipped']} "
        f"undecodable lines skipped, {docs['kept']} kept",
    ]
    views = f"{manifest['views']} view{'s' if manifest['views'] > 1 else ''}"
    for split, c in manifest["splits"].items():
        lines.append(
            f"  {split}: {c['documents']:,} docs, {c['tokens']:,} tokens -> {c['sequences']:,} "
            f"sequences of {manifest['seq_len']} x {views} = {c['examples']:,} examples "
            f"({c['remainder_tokens']} remainder tokens dropped)"
        )
    total = sum(c["tokens"] for c in manifest["splits"].values())
    lines.append(
        f"  total: {total:,} tokens; vocabulary {manifest['vocab_size']:,} ({manifest['tokenizer']})"
    )
    lines.append(
        f"  unigram loss of the validation targets: {manifest['unigram_loss']:.3f} "
        "(token frequencies alone; a model must get below it to have learned anything else)"
    )
    return "\n".join(lines)
