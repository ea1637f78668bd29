"""Tokenize -> pack -> mask -> shards: parallel over processes, resumable, bounded memory.

A split is the token stream of its documents in order, each closed by [SEP], cut into
blocks of `seq_len - 2` tokens framed as `[CLS] block [SEP]`; only the final partial
block (the *remainder*, fewer than `seq_len - 2` tokens) is dropped. That is the rule
packing the whole split as one batch followed (run_mlm's `group_texts` idiom applied to
one batch), and it gives the same sequences however the work is divided:

1. Tokenizing: each piece of consecutive documents (`OrderedDocuments.segments`) becomes
   one file of its stream (`work/<split>-<k>.npy`, int32 ids with the [SEP]s).
2. Packing and masking: the stream lengths give every piece's offset in the split's
   stream, so output shard j (sequences `j*R .. (j+1)*R`) reads exactly the slice
   `j*R*(seq_len-2) ..` it needs, across piece boundaries, without the rest of the split.
   Its rows are masked with their global example index (docs/design.md: the mask of
   example i depends on (seed, split, i) only).

Both steps write each file under a temporary name and rename it when whole; a file that
exists is finished, so an interrupted run skips it when it is started again. Output shards
are `<split>/data-<i>-of-<N>.arrow` in `save_to_disk`'s layout: `load_from_disk` reads them.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import DatasetInfo, Features, List, Value
from datasets.arrow_writer import ArrowWriter
from datasets.utils.py_utils import asdict
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from cached_mslt.data.documents import ROW_BATCH, Segment, read_texts
from cached_mslt.data.masking import SPLIT_IDS, MaskingSpec, mask_batch

ROW_BYTES_PER_TOKEN = 4 + 4 + 1  # input_ids, labels (int32), attention_mask (int8)
LOSS_BATCH = 4096  # rows per batch of the validation loss sum (fixes its float order)

_WORKER: dict[str, Any] = {}  # the tokenizer of this process (set before the pool forks)


def features(seq_len: int) -> Features:
    ids = List(Value("int32"), length=seq_len)
    return Features(
        {
            "sequence": Value("int32"),
            "view": Value("int32"),
            "input_ids": ids,
            "labels": ids,
            "attention_mask": List(Value("int8"), length=seq_len),
        }
    )


def run_tasks(fn: Callable, tasks: list, num_proc: int, desc: str, **state: Any) -> Iterator:
    """fn over tasks in order, in `num_proc` forked processes (in this one for 1). `state`
    becomes the workers' `_WORKER` (inherited by fork, never pickled per task)."""
    _WORKER.update(state)
    bar = tqdm(total=len(tasks), desc=desc, unit=" files")
    if num_proc <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield fn(task)
            bar.update()
    else:
        with multiprocessing.get_context("fork").Pool(min(num_proc, len(tasks))) as pool:
            for result in pool.imap(fn, tasks):
                yield result
                bar.update()
    bar.close()


# -- 1. tokenizing -------------------------------------------------------------------------


def encoder(tokenizer: PreTrainedTokenizerBase) -> Any:
    """The Rust tokenizer behind `tokenizer`, without truncation or padding: the ids of
    `tokenizer(texts, add_special_tokens=False)` at a fraction of the Python cost (a
    bundled tokenizer.json pins truncation at 128; transformers lifts it per call)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def tokenize_piece(task: tuple[Segment, str]) -> int:
    """Write one piece's stream (ids, [SEP] after each document); return its length."""
    segment, out = task
    if os.path.exists(out):
        return len(np.load(out, mmap_mode="r"))
    backend, sep = _WORKER["encoder"], _WORKER["sep_id"]
    texts, parts = read_texts(segment), []
    for i in range(0, len(texts), ROW_BATCH):
        ids = (
            e.ids
            for e in backend.encode_batch_fast(texts[i : i + ROW_BATCH], add_special_tokens=False)
        )
        parts.append(np.fromiter(chain.from_iterable((*x, sep) for x in ids), dtype=np.int32))
    stream = np.concatenate(parts)
    tmp = f"{out}.tmp.npy"
    np.save(tmp, stream)
    os.replace(tmp, out)
    return len(stream)


# -- 2. packing, masking and writing shards ------------------------------------------------


@dataclass(frozen=True)
class SplitStream:
    """A split's token stream as consecutive files, and how it is cut into sequences."""

    split: str
    files: tuple[str, ...]
    starts: tuple[int, ...]  # offset of each file in the stream, then the total length
    seq_len: int
    views: int
    rows_per_shard: int

    @property
    def sequences(self) -> int:
        return self.starts[-1] // (self.seq_len - 2)

    @property
    def shards_per_view(self) -> int:
        return math.ceil(self.sequences / self.rows_per_shard)

    def shard_path(self, out: Path, view: int, j: int) -> Path:
        total = self.views * self.shards_per_view
        return out / f"data-{view * self.shards_per_view + j:05d}-of-{total:05d}.arrow"

    def shard_paths(self, out: Path) -> list[Path]:
        """Every output shard, in row order."""
        return [
            self.shard_path(out, view, j)
            for view in range(self.views)
            for j in range(self.shards_per_view)
        ]

    def tokens(self, first: int, stop: int) -> np.ndarray:
        """Packed sequences `first:stop`: [CLS], seq_len - 2 stream tokens, [SEP]."""
        body = self.seq_len - 2
        a, b = first * body, stop * body
        parts = []
        for path, lo, hi in zip(self.files, self.starts[:-1], self.starts[1:], strict=True):
            if lo < b and hi > a:
                parts.append(np.load(path, mmap_mode="r")[max(a - lo, 0) : min(b, hi) - lo])
        blocks = np.concatenate(parts).reshape(-1, body)
        edge = np.ones((len(blocks), 1), dtype=np.int32)
        return np.hstack([edge * _WORKER["cls_id"], blocks, edge * _WORKER["sep_id"]])


def shard_tasks(stream: SplitStream, out: Path) -> list[tuple]:
    """One task per output shard, view 0 first (example i = view i // n of sequence i % n)."""
    n, rows = stream.sequences, stream.rows_per_shard
    return [
        (stream, out, view, j, j * rows, min(n, (j + 1) * rows))
        for view in range(stream.views)
        for j in range(stream.shards_per_view)
    ]


def write_shard(task: tuple) -> np.ndarray | None:
    """Pack, mask and write one output shard. For view 0 of a split, return the token
    counts of its sequences (the unigram model's training counts), even when the shard
    was written by an earlier, interrupted run."""
    stream, out, view, first, stop = task[0], task[1], task[2], task[4], task[5]
    path = stream.shard_path(out, view, task[3])
    if path.exists() and view > 0:
        return None
    tokens = stream.tokens(first, stop)
    counts = np.bincount(tokens.ravel(), minlength=_WORKER["vocab_size"]) if view == 0 else None
    if path.exists():
        return counts
    spec: MaskingSpec = _WORKER["masking"][stream.split]
    offset = view * stream.sequences
    masked = mask_batch(
        {"tokens": tokens}, range(offset + first, offset + stop), spec, SPLIT_IDS[stream.split]
    )
    rows = np.arange(first, stop, dtype=np.int32)
    columns = {"sequence": rows, "view": np.full_like(rows, view), **masked}
    _write_arrow(columns, features(stream.seq_len), path)
    return counts


def _write_arrow(columns: dict[str, np.ndarray], feats: Features, path: Path) -> None:
    arrays = []
    for name in feats:
        values = columns[name]
        array = pa.array(values.ravel())
        if values.ndim == 2:
            array = pa.FixedSizeListArray.from_arrays(array, values.shape[1])
        arrays.append(array)
    table = pa.Table.from_arrays(arrays, schema=feats.arrow_schema)
    tmp = path.with_name(path.name + ".tmp")
    writer = ArrowWriter(features=feats, path=str(tmp))
    writer.write_table(table)
    writer.finalize()
    writer.close()
    os.replace(tmp, path)


def write_dataset_files(stream: SplitStream, out: Path, fingerprint: str) -> None:
    """state.json and dataset_info.json as `save_to_disk` writes them, naming every shard."""
    feats = features(stream.seq_len)
    state = {
        "_data_files": [{"filename": path.name} for path in stream.shard_paths(out)],
        "_fingerprint": fingerprint[:16],
        "_format_columns": sorted(feats),
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (out / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = asdict(DatasetInfo(features=feats))  # datasets' asdict, as save_to_disk uses
    (out / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2))


# -- the unigram reference ---------------------------------------------------------------


def unigram_log_probs(counts: np.ndarray, special_ids: Iterable[int]) -> np.ndarray:
    """log p(token) from training counts: add-one smoothed, special tokens given none."""
    counts = counts.astype(np.float64)
    counts[list(special_ids)] = 0
    return np.log((counts + 1.0) / (counts.sum() + len(counts)))


def loss_on_labels(label_batches: Iterable[np.ndarray], log_p: np.ndarray) -> float:
    """Mean -log p over the labelled positions, summed per batch in order."""
    total, n = 0.0, 0
    for labels in label_batches:
        targets = labels[labels >= 0]
        total, n = total - log_p[targets].sum(), n + targets.size
    return total / max(n, 1)


def shard_labels(paths: Iterable[Path], rows: int = LOSS_BATCH) -> Iterator[np.ndarray]:
    """The `labels` of shard files in order, re-batched to `rows` rows whatever the shard
    sizes (so the float sum is the one a single dataset iterated by `rows` gives)."""
    pending: list[np.ndarray] = []
    for path in paths:
        table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        labels = table.column("labels").combine_chunks()
        pending.append(labels.flatten().to_numpy().reshape(len(labels), -1))
        stacked = np.concatenate(pending)
        full = len(stacked) // rows * rows
        yield from (stacked[i : i + rows] for i in range(0, full, rows))
        pending = [stacked[full:]]
    if pending and len(pending[0]):
        yield pending[0]
