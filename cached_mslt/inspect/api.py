"""Read-only access to an activation store for notebooks and for the inspect tools.

Everything here reads whole chunks: one row costs as much as its chunk (docs/library-facts.md), so
blocks are chunk-aligned and samples are made of whole chunks spread over the store.

    store = open_store("runs/tiny/cache/stage-2")
    for block in iter_blocks(store, block_ranges(store, rows=4096)):
        block["hidden"]  # torch [rows, T, H] in the logical dtype
    rows = read_block(store, 0, 64, numpy=True)   # numpy, bfloat16 widened to float32
    for row in iter_rows(store): ...              # `datasets`-style: one dict per row
    view = labelled(store, 0, 64)                 # numpy values with named dims and coords
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from storage import ActivationStore

# Blocks of ~16 MiB of hidden: large enough that Zarr's per-call overhead is small next to
# the decode, small enough that a few blocks in flight stay far below any real memory limit.
BLOCK_BYTES = 16 << 20
DIMS = {
    "hidden": ("row", "token", "hidden"),
    "attention_mask": ("row", "token"),
    "labels": ("row", "token"),
    "row_index": ("row",),
}


def open_store(
    url: str | os.PathLike[str],
    *,
    expected_fingerprint: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ActivationStore:
    """Open a store read-only: a complete one, or a write-through one holding the rows its
    stage read (docs/cache-format.md); IncompleteStoreError, StaleStoreError and
    CorruptStoreError say why not. `storage_options`: endpoint, credentials (fsspec)."""
    store = ActivationStore.open(
        url,
        mode="r",
        expected_fingerprint=expected_fingerprint,
        require_complete=False,
        storage_options=storage_options,
    )
    if not store.is_complete and not is_write_through(store):
        # raises IncompleteStoreError with its fix
        ActivationStore.open(url, mode="r", storage_options=storage_options)
    return store


def is_write_through(store: ActivationStore) -> bool:
    """Filled by training steps: incomplete by design, its units the set markers."""
    return store.attrs.get("built") == "write-through"


def block_ranges(
    store: ActivationStore,
    rows: int | None = None,
    *,
    target_bytes: int = BLOCK_BYTES,
    rows_per_chunk: int | None = None,
) -> list[tuple[int, int]]:
    """Chunk-aligned row ranges [start, stop) covering the store (rows=None) or a sample
    of about `rows` rows: whole chunks spread evenly over the store, so a sample sees
    every part of the data (stores keep the prepared order) at full read speed.

    `rows_per_chunk` overrides the alignment (several stores read in lockstep align to
    the least common multiple of theirs).
    """
    n = store.spec.num_rows
    rpc = rows_per_chunk or store.rows_per_chunk
    held = _held_chunks(store, rpc)
    if rows is None or rows >= len(held) * rpc:
        chunks = held
    else:
        want = max(1, math.ceil(rows / rpc))
        picks = np.linspace(0, len(held), want, endpoint=False).astype(np.int64)
        chunks = np.unique(held[picks])
    per_block = max(1, target_bytes // (rpc * store.spec.row_bytes))
    ranges: list[tuple[int, int]] = []
    # Merge runs of consecutive chunks, then cut them into blocks of `per_block` chunks.
    for run in np.split(chunks, np.flatnonzero(np.diff(chunks) != 1) + 1):
        for i in range(0, len(run), per_block):
            first, last = int(run[i]), int(run[min(i + per_block, len(run)) - 1])
            ranges.append((first * rpc, min((last + 1) * rpc, n)))
    return ranges


def _held_chunks(store: ActivationStore, rpc: int) -> np.ndarray:
    """Indices of the `rpc`-row chunks the store holds: all of a complete store's, the
    present units' rows of a write-through store."""
    num_chunks = math.ceil(store.spec.num_rows / rpc)
    if store.is_complete:
        return np.arange(num_chunks)
    held = np.zeros(num_chunks, dtype=bool)
    for shard in store.shards_done():
        a, b = store.shard_rows(shard)
        held[a // rpc : math.ceil(b / rpc)] = True
    return np.flatnonzero(held)


_DONE = object()


def iter_blocks(
    store: ActivationStore, ranges: list[tuple[int, int]], *, prefetch: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """`store.read_rows` over `ranges`, in order. With `prefetch` a background thread
    reads block i+1 while the caller computes on block i (Zarr's decode and torch's
    kernels release the GIL), so statistics cost little more than the read itself.
    Errors of the reader thread (checksum, missing shard) are raised here."""
    if not prefetch:
        for start, stop in ranges:
            yield store.read_rows(start, stop)
        return
    ready: queue.Queue[Any] = queue.Queue(maxsize=1)  # one block ahead bounds memory
    stop_event = threading.Event()

    def hand_over(item: Any) -> bool:
        while not stop_event.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read_ahead() -> None:
        try:
            for start, stop in ranges:
                if not hand_over(store.read_rows(start, stop)):
                    return
            hand_over(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it
            hand_over(e)

    reader = threading.Thread(target=read_ahead, name="inspect-read-ahead", daemon=True)
    reader.start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop_event.set()  # the consumer stopped early: let the reader exit
        reader.join()


def to_numpy(block: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A `read_rows` result as numpy arrays; bfloat16 hidden states are widened to float32
    (numpy has no bfloat16; the widening is exact)."""
    out = {k: v.numpy() for k, v in block.items() if k != "hidden"}
    hidden = block["hidden"]
    out["hidden"] = (hidden.float() if hidden.dtype == torch.bfloat16 else hidden).numpy()
    return out


@contextmanager
def single_threaded_compute() -> Iterator[None]:
    """Run torch ops on one thread for the duration (restored after).

    The streaming passes work on cache-sized pieces, where a second intra-op thread gains
    little, and on a shared machine whose other core is busy every parallel region
    waits for a descheduled thread: tiny reductions were measured 100-300x slower with 2
    threads than with 1. The parallelism comes from the read-ahead thread instead.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_block(
    store: ActivationStore, start: int, stop: int, *, numpy: bool = False
) -> dict[str, Any]:
    """Rows [start, stop) as torch tensors (`read_rows`), or as numpy (`to_numpy`)."""
    rows = store.read_rows(start, stop)
    return to_numpy(rows) if numpy else rows


def iter_rows(
    store: ActivationStore, rows: int | None = None, *, numpy: bool = True
) -> Iterator[dict[str, Any]]:
    """One dict per row, like iterating a `datasets.Dataset`: hidden [T, H],
    attention_mask [T], labels [T], row_index (int). Reads chunk-aligned blocks."""
    for block in iter_blocks(store, block_ranges(store, rows)):
        arrays: dict[str, Any] = to_numpy(block) if numpy else block
        for i in range(len(arrays["row_index"])):
            row = {k: v[i] for k, v in arrays.items()}
            row["row_index"] = int(row["row_index"])
            yield row


@dataclass
class LabelledArray:
    """A tiny stand-in for an `xarray.DataArray` (xarray is not a dependency): values with
    named dims and coordinates. `row` coordinates are store rows, `row_index` the
    prepared example each row came from."""

    values: np.ndarray
    dims: tuple[str, ...]
    coords: dict[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)

    def sel(self, **where: int) -> LabelledArray:
        """Select one label per dim, e.g. `sel(row_index=17)` or `sel(row=3, token=0)`."""
        values, dims, coords = self.values, list(self.dims), dict(self.coords)
        for name, label in where.items():
            dim = "row" if name == "row_index" else name
            if dim not in dims:
                raise KeyError(f"no dim {dim!r}; dims are {dims}")
            hits = np.flatnonzero(coords[name] == label)
            if not len(hits):
                raise KeyError(f"{name}={label} is not in this block")
            axis = dims.index(dim)
            values = np.take(values, hits[0], axis=axis)
            dims.pop(axis)
            # row_index labels the row dim: it goes with it.
            gone = {dim, "row_index"} if dim == "row" else {dim}
            coords = {k: v for k, v in coords.items() if k not in gone}
        return LabelledArray(values, tuple(dims), coords, self.attrs)


def labelled(store: ActivationStore, start: int, stop: int) -> dict[str, LabelledArray]:
    """Rows [start, stop) of every array as `LabelledArray`s with dims row/token/hidden."""
    block = read_block(store, start, stop, numpy=True)
    coords = {"row": np.arange(start, stop), "row_index": block["row_index"]}
    coords |= {"token": np.arange(store.spec.seq_len), "hidden": np.arange(store.spec.hidden_size)}
    attrs = {"url": store.url, "stage": store.attrs.get("stage"), "dtype": store.spec.dtype}
    return {
        name: LabelledArray(
            block[name], dims, {d: coords[d] for d in (*dims, "row_index") if d in coords}, attrs
        )
        for name, dims in DIMS.items()
    }
