"""Offline data preparation: text corpora -> packed, statically masked MLM examples on disk.

read -> clean -> order by seeded hash -> deduplicate -> split by document -> (fit a
WordPiece vocabulary to the training split) -> tokenize -> pack -> K masked views ->
shards, all deterministic, so the output is a function of the fingerprint (documents,
tokenizer vocabulary and settings). Every step streams: documents and tokens live in
files on disk (`cached_mslt/data/documents.py`, `cached_mslt/data/packing.py`), memory holds a
bounded slice of them, and the heavy steps run in `--num_proc` processes. Neither
`num_proc` nor the shard size changes a single output byte (docs/data.md).

On disk, `prepared_dir/` holds `train/` and `valid/` (datasets in `save_to_disk`'s
layout, one or more `data-*.arrow` shards each), `tokenizer/` (the tokenizer the ids
belong to, trained or bundled: every checkpoint of a run is saved with it) and
`manifest.json`, written last. The manifest records the unigram loss of the validation
targets (`unigram_loss`): the loss of a model that knows token frequencies and nothing
else, the reference every validation loss is shown beside.

Everything is built in a hidden directory next to the target, `.<name>.partial-<key>`,
named after the documents and settings, and renamed into place when whole, so a crash
never leaves a directory that looks complete. An interrupted run leaves that directory
behind: its trained vocabulary, token streams and finished shards are reused when the
same command runs again. Bad input (a `DataError`) removes it.

Each split's columns: `input_ids` (int32, masked), `labels` (int32, -100 where not
masked), `attention_mask` (int8, all ones: packing leaves no padding), `sequence` and
`view` (int32). Example i is view `i // num_sequences` of packed sequence
`i % num_sequences`, so all of view 0 comes first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, load_from_disk
from transformers import PreTrainedTokenizerBase

from cached_mslt.config import ConfigError, DataArgs, RunArgs
from cached_mslt.data.corpora import Corpus, DataError, iter_corpus
from cached_mslt.data.documents import (
    DocumentCounts,
    OrderedDocuments,
    order_documents,
    text_digest,
    write_read_files,
)
from cached_mslt.data.masking import MaskingSpec
from cached_mslt.data.packing import (
    ROW_BYTES_PER_TOKEN,
    SplitStream,
    encoder,
    loss_on_labels,
    run_tasks,
    shard_labels,
    shard_tasks,
    tokenize_piece,
    unigram_log_probs,
    write_dataset_files,
    write_shard,
)
from cached_mslt.data.tokenizer import (
    TRAINED,
    TokenizerError,
    check_vocab,
    load_tokenizer,
    train_wordpiece,
)

logger = logging.getLogger(__name__)

# Bump when the pipeline's output changes for the same inputs: old directories then
# stop matching instead of being silently reused.
FORMAT_VERSION = 2  # 2: tokenizer/ saved beside the splits, unigram_loss in the manifest
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "valid")
# Text per read/ordered file, and about the bytes per output shard: what one process
# holds in memory at a time (a few times this), whatever the corpus size.
SHARD_BYTES = 64 << 20


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


def corpus_tokenizer(data: DataArgs, ordered: OrderedDocuments) -> PreTrainedTokenizerBase:
    """The tokenizer the data is prepared with: a WordPiece vocabulary fitted to the
    training split (`--tokenizer train`; validation text never shapes the vocabulary),
    streamed from the ordered documents, or the bundled / a local one, checked against
    `--vocab_size` when that is given."""
    if data.tokenizer == TRAINED:
        return train_wordpiece(
            lambda: ordered.batches("train"), data.vocab_size, data.vocab_min_frequency
        )
    tokenizer = load_tokenizer(data.tokenizer)
    if data.vocab_size is not None:
        check_vocab(tokenizer, data.vocab_size, source="model config (--vocab_size)")
    return tokenizer


def unigram_loss(train: Dataset, valid: Dataset, vocab_size: int, special_ids: list[int]) -> float:
    """Cross-entropy (nats) on the validation targets of a model that predicts every masked
    token from the training split's token frequencies alone (add-one smoothed, special
    tokens excluded): the level a model reaches by counting words. A loss is only
    meaningful beside it. Reads both splits in batches (no split is held in memory);
    `prepare_dataset` computes the same from its shards (`packing.py`)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for batch in train.with_format("numpy").iter(batch_size=4096):
        first_view = batch["view"] == 0  # every view holds the same tokens
        labels, ids = batch["labels"][first_view], batch["input_ids"][first_view]
        original = np.where(labels >= 0, labels, ids)  # masking changed only labelled places
        counts += np.bincount(original.ravel(), minlength=vocab_size)
    batches = (b["labels"] for b in valid.with_format("numpy").iter(batch_size=4096))
    return loss_on_labels(batches, unigram_log_probs(counts, special_ids))


def data_fingerprint(
    ordered: OrderedDocuments, tokenizer: PreTrainedTokenizerBase, data: DataArgs
) -> str:
    """sha256 over everything the prepared examples depend on (not num_proc: it must not
    matter), the documents streamed from disk in order."""
    h = hashlib.sha256()
    settings = {
        "format_version": FORMAT_VERSION,
        **_example_settings(data),
        "tokenizer_class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    text_digest(ordered, SPLITS, h)
    return h.hexdigest()


def _resume_key(ordered: OrderedDocuments, data: DataArgs, vocab: dict | None) -> str:
    """Names the partial directory: the documents and every setting the output depends on
    (for a given tokenizer, its vocabulary; for a trained one, how it is trained)."""
    settings = {
        "format_version": FORMAT_VERSION,
        **_example_settings(data),
        "tokenizer": data.tokenizer,
        "training": [data.vocab_size, data.vocab_min_frequency],
        "vocab": sorted(vocab.items(), key=lambda kv: kv[1]) if vocab else None,
    }
    return hashlib.sha256(f"{json.dumps(settings)}\0{ordered.content}".encode()).hexdigest()


def prepare_dataset(args: RunArgs, overwrite: bool = False, shard_bytes: int = SHARD_BYTES) -> Path:
    """Prepare `args.data.corpus` into `args.data.prepared_dir` (or reuse it); return the path.

    `shard_bytes` sizes the files the work is divided into (see SHARD_BYTES); it changes
    how many there are, never what they hold."""
    data = args.data
    if not 0.0 < data.valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction must be in (0, 1), got {data.valid_fraction}")
    if data.views < 1:
        raise ConfigError(f"views must be at least 1, got {data.views}")
    target = Path(data.prepared_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f".{target.name}.read-{uuid.uuid4().hex[:8]}")
    scratch.mkdir()
    partial: Path | None = None
    try:
        corpus, counts, ordered = _read_documents(data, scratch, shard_bytes)
        given = None if data.tokenizer == TRAINED else corpus_tokenizer(data, ordered)
        key = _resume_key(ordered, data, given.get_vocab() if given else None)
        partial = target.with_name(f".{target.name}.partial-{key[:16]}")
        tokenizer = given if given is not None else _trained_tokenizer(data, ordered, partial)
        fingerprint = data_fingerprint(ordered, tokenizer, data)
        if _reuse_or_refuse(target, fingerprint, overwrite):
            shutil.rmtree(partial, ignore_errors=True)
            return target
        _build(partial, ordered, tokenizer, data, shard_bytes, fingerprint, corpus, counts)
        _publish(partial, target)
    except (ConfigError, DataError, TokenizerError):
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)  # the input is wrong: nothing to resume
        raise
    except BaseException:
        if partial is not None and partial.exists():
            logger.warning("interrupted: %s keeps the finished work; rerun to resume", partial)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("wrote %s", target)
    return target


def _read_documents(
    data: DataArgs, scratch: Path, shard_bytes: int
) -> tuple[Corpus, DocumentCounts, OrderedDocuments]:
    """Read, clean, order and deduplicate the corpus into `scratch`; refuse too little text."""
    corpus = Corpus()
    texts = iter_corpus(
        data.corpus,
        corpus,
        text_column=data.text_column,
        strict=data.strict,
        max_documents=data.max_documents,
    )
    read_files, counts = write_read_files(texts, data.split_seed, scratch, shard_bytes)
    if counts.read == counts.empty_dropped:
        sources = [s["source"] for s in corpus.sources]
        if corpus.undecodable_lines:
            raise DataError(
                f"no text left in {sources}: {corpus.undecodable_lines} lines were skipped as "
                "not valid UTF-8; expected UTF-8 text. Re-encode the corpus (e.g. `iconv -f "
                "latin1 -t utf-8`), or rerun with --strict to see the first undecodable file "
                "and byte offset"
            )
        raise DataError(
            f"no text left after cleaning {sources} ({counts.read} documents read, all empty "
            "or duplicates); check --corpus and --text_column"
        )
    ordered = order_documents(read_files, counts, scratch, shard_bytes, data.valid_fraction)
    for path in read_files:
        path.unlink()  # the ordered files hold everything now
    if ordered.total < 2:
        raise DataError(
            f"the corpus has {ordered.total} document(s) after cleaning; a train/validation "
            "split needs at least 2: add text to --corpus"
        )
    return corpus, counts, ordered


def _trained_tokenizer(
    data: DataArgs, ordered: OrderedDocuments, partial: Path
) -> PreTrainedTokenizerBase:
    """Fit the vocabulary, or load the one an interrupted run of the same data fitted."""
    saved = partial / TOKENIZER_DIR
    if saved.is_dir():
        logger.info("resuming %s: its vocabulary is trained already", partial)
        return load_tokenizer(str(saved))
    tokenizer = corpus_tokenizer(data, ordered)
    partial.mkdir(exist_ok=True)
    _save_tokenizer(tokenizer, saved)
    return tokenizer


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tokenizer.save_pretrained(str(tmp))
    os.replace(tmp, path)


def _build(
    partial: Path,
    ordered: OrderedDocuments,
    tokenizer: PreTrainedTokenizerBase,
    data: DataArgs,
    shard_bytes: int,
    fingerprint: str,
    corpus: Corpus,
    counts: DocumentCounts,
) -> None:
    """Tokenize both splits, refuse a split too small for one sequence, then pack, mask
    and write every shard; the manifest goes last."""
    partial.mkdir(exist_ok=True)
    if not (partial / TOKENIZER_DIR).is_dir():
        _save_tokenizer(tokenizer, partial / TOKENIZER_DIR)
    rows = max(1, shard_bytes // (data.seq_len * ROW_BYTES_PER_TOKEN + 8))
    streams = {
        s: _tokenize_split(s, ordered, tokenizer, data, partial / "work", rows) for s in SPLITS
    }
    split_counts = {s: _split_counts(s, streams[s], ordered.documents(s), data) for s in SPLITS}
    state = dict(
        cls_id=tokenizer.cls_token_id,
        sep_id=tokenizer.sep_token_id,
        vocab_size=len(tokenizer),
        masking={s: _masking(s, tokenizer, data) for s in SPLITS},
    )
    token_counts = {}
    for split in SPLITS:
        out = partial / split
        out.mkdir(exist_ok=True)
        tasks = shard_tasks(streams[split], out)
        results = run_tasks(write_shard, tasks, data.num_proc, f"Masking {split}", **state)
        token_counts[split] = sum(c for c in results if c is not None)
        write_dataset_files(streams[split], out, fingerprint)
    log_p = unigram_log_probs(token_counts["train"], tokenizer.all_special_ids)
    valid_loss = loss_on_labels(
        shard_labels(streams["valid"].shard_paths(partial / "valid")), log_p
    )
    manifest = _manifest(fingerprint, corpus, counts, ordered, split_counts, tokenizer, data)
    manifest["unigram_loss"] = valid_loss
    shutil.rmtree(partial / "work")
    # The manifest is written last: its presence marks the directory as complete.
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _masking(split: str, tokenizer: PreTrainedTokenizerBase, data: DataArgs) -> MaskingSpec:
    # Validation is masked at its own rate (BERT's 15% by default), so losses stay
    # comparable between runs that train at different masking rates.
    rate = data.mask_prob if split == "train" else data.valid_mask_prob
    return MaskingSpec.for_tokenizer(tokenizer, data.mask_seed, rate)


def _tokenize_split(
    split: str,
    ordered: OrderedDocuments,
    tokenizer: PreTrainedTokenizerBase,
    data: DataArgs,
    work: Path,
    rows_per_shard: int,
) -> SplitStream:
    work.mkdir(exist_ok=True)
    tasks = [
        (seg, str(work / f"{split}-{k:05d}.npy")) for k, seg in enumerate(ordered.segments(split))
    ]
    lengths = run_tasks(
        tokenize_piece,
        tasks,
        data.num_proc,
        f"Tokenizing {split}",
        encoder=encoder(tokenizer),
        sep_id=tokenizer.sep_token_id,
    )
    starts = np.cumsum([0, *lengths]).tolist()
    files = tuple(out for _, out in tasks)
    return SplitStream(
        split, files, tuple(starts), data.seq_len, split_views(split, data), rows_per_shard
    )


def split_views(split: str, data: DataArgs) -> int:
    """Masked views of a split's sequences: `--views` for training, one for validation,
    which measures and does not train: one mask keeps its loss (and its unigram loss)
    the same for every `--views` and costs one pass to evaluate (docs/levers.md, growth that pays)."""
    return data.views if split == "train" else 1


def _split_counts(
    split: str, stream: SplitStream, documents: int, data: DataArgs
) -> dict[str, int]:
    tokens = stream.starts[-1] - documents  # the stream holds one [SEP] per document
    n = stream.sequences
    if n == 0:
        raise DataError(
            f"the {split} split has {tokens} tokens, less than one sequence of seq_len="
            f"{data.seq_len}; add text to --corpus or {'raise' if split == 'valid' else 'lower'} "
            "--valid_fraction"
        )
    return {
        "documents": documents,
        "tokens": tokens,
        "sequences": n,
        "examples": n * split_views(split, data),
        # The stream is tokens plus one [SEP] per document; this tail did not fill a block.
        "remainder_tokens": stream.starts[-1] - n * (data.seq_len - 2),
    }


def _manifest(
    fingerprint: str,
    corpus: Corpus,
    counts: DocumentCounts,
    ordered: OrderedDocuments,
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
            "read": counts.read,
            "empty_dropped": counts.empty_dropped,
            "duplicates_dropped": counts.duplicates_dropped,
            "undecodable_lines_skipped": corpus.undecodable_lines,
            "kept": ordered.total,
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
    for split, c in manifest["splits"].items():
        n = c["examples"] // c["sequences"]
        views = f"{n} view{'s' if n > 1 else ''}"
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
