"""A task's frozen-bottom outputs in activation stores: one store per split, built once
for a checkpoint, K and the task data, then read by every seed and learning rate of a
fine-tuning sweep and by the linear probe (docs/evaluation.md, fine-tuning from the cache).

The stores are ordinary activation stores (docs/cache-format.md) built by the stages'
eager `build_cache`: the same distributed, resumable, checksummed build, the same
fingerprint check (a store of other weights or other rows is refused as stale) and the
same incremental rebuild, which progressive freezing uses to push a store through the
layers it has just frozen. What a classification row needs from them:

- `hidden`: the frozen bottom's output for the row, in an array as long as the store's
  length T (the longest row of the task, at most `--max_seq_len`). The bottom computes
  each row at its own length rounded up to ROW_LENGTH_MULTIPLE (zeros beyond), not at T:
  a row costs its own length, and its stored entry never depends on which batch it is
  built or read in (`cached_mslt/stages/cache.py: by_row_length`).
- `attention_mask`: 1 on real tokens: the top's layers read it, and a batch is cut to its
  longest row before the top runs (the cut columns are padding only).
- `labels`: the class id at position 0 (the [CLS] row, which the pooler reads), -100
  elsewhere. `row_index`: the row's index in its split.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import DatasetDict
from transformers import PreTrainedModel

from cached_mslt.evaluation.args import FinetuneArgs, FinetuneError
from cached_mslt.models import IGNORE_INDEX
from cached_mslt.stages import CacheRequest, build_cache
from storage import ActivationStore, StaleStoreError, StoreSpec

SPLITS = ("train", "validation", "test")
BUILD_SHARDS = 16  # storage/spec.py's MIN_SHARDS: a shard per chunk up to 16 processes
# A row's computed length is a multiple of this: few enough lengths that the bottom runs
# a batch in a handful of matmul-sized groups, close enough to the real length that
# short rows (sentiment: 31 tokens on average, T = 75) pay about their own length.
ROW_LENGTH_MULTIPLE = 16


@dataclass(frozen=True)
class StoreLocation:
    """Where a task's stores live: `<root>/<task>/frozen-K/<split>`. `root` None: under the
    task's output directory. Options reach the URL's filesystem and are never recorded."""

    root: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    overwrite: bool = False

    def url(self, default_root: str, task: str, depth: int, split: str, run: str = "") -> str:
        base = (self.root or default_root).rstrip("/")
        sub = f"{run}/" if run else ""
        return f"{base}/{task}/{sub}frozen-{depth}/{split}"


class _Columns:
    """Padded token-id columns of a split, sliced as the cache build reads a prepared set."""

    def __init__(self, columns: dict[str, np.ndarray]):
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["input_ids"])

    def __getitem__(self, rows: slice) -> dict[str, np.ndarray]:
        return {k: v[rows] for k, v in self.columns.items()}


def padded_columns(split, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A tokenized split as fixed-length arrays: ids padded to `seq_len`, the mask, and the
    class label at position 0 with IGNORE_INDEX elsewhere (the store's `labels` layout)."""
    ids_list = split["input_ids"]
    n = len(ids_list)
    ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    mask = np.zeros((n, seq_len), dtype=np.int64)
    for i, row in enumerate(ids_list):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    labels[:, 0] = np.asarray(split["label"], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def store_length(data: DatasetDict) -> int:
    """T of a task's stores: its longest tokenized row (already cut to --max_seq_len)."""
    return max(max(len(r) for r in data[s]["input_ids"]) for s in SPLITS)


def data_fingerprint(task_fingerprint: str, split: str, columns: dict[str, np.ndarray]) -> str:
    """The rows a store is a function of: the task, the split and its padded token ids
    (which also fix the tokenizer, --max_seq_len and --max_train_examples)."""
    h = hashlib.sha256(f"{task_fingerprint}/{split}".encode())
    for name in sorted(columns):
        h.update(name.encode() + str(columns[name].shape).encode())
        h.update(np.ascontiguousarray(columns[name]).tobytes())
    return h.hexdigest()


@dataclass
class TaskStores:
    """A task's stores at one frozen depth, and the padded rows they were built from."""

    depth: int
    stores: dict[str, ActivationStore]
    columns: dict[str, dict[str, np.ndarray]]
    stats: dict[str, Any]
    _in_memory: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def in_memory(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every split's stored rows, read once (`read_split`) and shared by the runs."""
        if not self._in_memory:
            self._in_memory = {s: read_split(store) for s, store in self.stores.items()}
        return self._in_memory


def _request(url, depth, columns, fp, args: FinetuneArgs, options, hidden: int) -> CacheRequest:
    n, t = columns["input_ids"].shape
    # ~2 MiB chunks, but at least 16 of them: a store then has a shard per chunk for up to
    # 16 processes to build (storage/spec.py MIN_SHARDS), even for a small task.
    derived = StoreSpec(n, t, hidden, dtype=args.freeze_cache_dtype).rows_per_chunk
    rows_per_chunk = max(1, min(derived, -(-n // BUILD_SHARDS)))
    return CacheRequest(
        url=url,
        frozen_layers=depth,
        dtype=args.freeze_cache_dtype,
        codec="none",
        rows_per_chunk=rows_per_chunk,
        data_fingerprint=fp,
        mask_seed=0,  # classification rows are not masked
        seq_len=t,
        num_rows=n,
        stage=0,  # not a pretraining stage; `frozen_layers` says the depth
        storage_options=options,
        length_multiple=ROW_LENGTH_MULTIPLE,
    )


def build_task_stores(
    model: PreTrainedModel,
    columns: dict[str, dict[str, np.ndarray]],
    urls: dict[str, str],
    depth: int,
    args: FinetuneArgs,
    location: StoreLocation,
    *,
    task_fingerprint: str,
    source: TaskStores | None = None,
    overwrite: bool | None = None,
) -> TaskStores:
    """Build (or reuse, if complete and matching) the stores of every split at `depth`, on
    every process. `source`: the same rows' stores at a shallower depth, pushed through the
    newly frozen layers only (an incremental build). A store at a URL that holds other
    weights or rows is refused with the fix (StaleStoreError -> FinetuneError)."""
    overwrite = location.overwrite if overwrite is None else overwrite
    stores, stats = {}, {"depth": depth, "cpu_s": 0.0, "wall_s": 0.0, "reused": True, "rows": 0}
    for split in SPLITS:
        fp = data_fingerprint(task_fingerprint, split, columns[split])
        req = _request(
            urls[split],
            depth,
            columns[split],
            fp,
            args,
            location.storage_options,
            model.config.hidden_size,
        )
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            stores[split], built = build_cache(
                model,
                req,
                _Columns(columns[split]),
                source=source.stores[split] if source and source.depth > 0 else None,
                overwrite=overwrite,
            )
        except StaleStoreError as e:
            raise FinetuneError(
                f"{e}\nFine-tuning refuses a stale task store. Rebuild it with "
                "--overwrite_cache, or give this checkpoint/task its own --cache_url"
            ) from e
        stats["cpu_s"] += time.process_time() - cpu
        stats["wall_s"] += time.perf_counter() - wall
        stats["reused"] &= built["reused"]
        stats["rows"] += built["rows"]
        for rank, n in enumerate(built.get("rows_per_process", [])):
            stats.setdefault("rows_per_process", [0] * len(built["rows_per_process"]))
            stats["rows_per_process"][rank] += n
    stats["urls"] = dict(urls)
    return TaskStores(depth, stores, columns, stats)


def read_split(store: ActivationStore) -> dict[str, torch.Tensor]:
    """A whole split's stored rows in memory (tasks here are a few hundred MB at most), in
    float32 as the top computes, with the mask and the class labels."""
    rows = store.read_rows(0, store.spec.num_rows)
    return {
        "hidden": rows["hidden"].to(torch.float32),
        "attention_mask": rows["attention_mask"].to(torch.long),
        "labels": rows["labels"][:, 0].to(torch.long),
    }
