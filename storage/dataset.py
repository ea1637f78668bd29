"""Feeding training from a store: chunk-aligned blocks, shuffled deterministically.

An item is a block of whole chunks (one contiguous read; reading one row costs as much as
its whole chunk, docs/library-facts.md). A batch concatenates `rows_per_batch // block_rows` blocks
drawn in a seeded random order, so rows are shuffled over blocks and mixed within a
window of one batch. The order depends only on (seed, epoch): every process of a
distributed run computes the same order and `accelerator.prepare` hands each one
disjoint batches of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from storage.errors import StoreSpecError
from storage.store import ActivationStore


class BlockDataset(Dataset[dict[str, torch.Tensor]]):
    """Item i = rows [i * block_rows, (i + 1) * block_rows) as `read_rows` returns them.

    `block_rows` defaults to the store's rows_per_chunk and must be a multiple of it
    (unless `in_memory`, which loads every array once and slices RAM). The last block is
    short when block_rows does not divide the row count.
    """

    def __init__(
        self, store: ActivationStore, *, block_rows: int | None = None, in_memory: bool = False
    ):
        rpc = store.rows_per_chunk
        block_rows = rpc if block_rows is None else block_rows
        if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
            raise StoreSpecError(f"block_rows must be a positive int, got {block_rows!r}")
        if not in_memory and block_rows % rpc:
            raise StoreSpecError(
                f"block_rows={block_rows} is not a multiple of the store's rows_per_chunk={rpc}: "
                f"blocks that split chunks decode each chunk twice. Use a multiple of {rpc}, or "
                f"in_memory=True"
            )
        self.store = store
        self.block_rows = block_rows
        self.num_rows = store.spec.num_rows
        self.in_memory = in_memory
        self._rows = store.read_rows(0, self.num_rows) if in_memory else None

    def __len__(self) -> int:
        return math.ceil(self.num_rows / self.block_rows)

    def block_range(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range [0, {len(self)})")
        start = i * self.block_rows
        return start, min(start + self.block_rows, self.num_rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start, stop = self.block_range(i)
        if self._rows is not None:
            return {k: v[start:stop] for k, v in self._rows.items()}
        return self.store.read_rows(start, stop)

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """A batch's blocks in one concurrent read (DataLoader calls this when it exists)."""
        if self._rows is not None:
            return [self[i] for i in indices]
        return self.store.read_blocks([self.block_range(i) for i in indices])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.in_memory:
            state["store"] = (
                None  # workers need only the rows; memory:// stores do not cross processes
            )
        return state


class BlockSampler(Sampler[int]):
    """Block indices in a random order that depends only on (seed, epoch).

    Deliberately has no `generator` attribute: accelerate would adopt it as a
    "synchronized generator" and reseed it from rank 0's state; here every rank derives
    the same order from (seed, epoch) itself, so there is nothing to synchronize.
    """

    def __init__(self, num_blocks: int, *, shuffle: bool, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise StoreSpecError(f"seed must be a non-negative int, got {seed!r}")
        self.num_blocks = num_blocks
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_blocks))
        rng = np.random.default_rng([self.seed, self.epoch])
        return iter(rng.permutation(self.num_blocks).tolist())

    def __len__(self) -> int:
        return self.num_blocks


def concat_blocks(blocks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Collate: the rows of several blocks as one batch (module level: workers pickle it)."""
    return {key: torch.cat([b[key] for b in blocks]) for key in blocks[0]}


class Blocks(Protocol):
    """What `make_block_loader` needs: a map-style dataset of row blocks."""

    block_rows: int

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]: ...


class BlockLoader(DataLoader):
    """A DataLoader over blocks with `set_epoch`, like accelerate's prepared loaders."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]


def make_block_loader(
    dataset: Blocks,
    *,
    rows_per_batch: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> BlockLoader:
    """Map-style loader yielding batches of `rows_per_batch` rows (fewer at the end).

    `dataset` is a `BlockDataset` or any map-style dataset of blocks with `block_rows`.

    `pin_memory` (for a CUDA device): batches arrive in page-locked memory, so the copy to
    the device can run without the host waiting for it (`non_blocking=True`). With workers
    the loader already reads ahead (`prefetch_factor` batches per worker) while a step runs.

    Call `set_epoch(epoch)` before each epoch (a loader from `accelerator.prepare` does it
    itself). Under accelerate, a batch count that does not divide by the process count
    makes `even_batches` (the default) repeat the first batches; pass drop_last=True or
    size the data so each epoch covers every row exactly once.
    """
    if rows_per_batch < 1 or rows_per_batch % dataset.block_rows:
        raise StoreSpecError(
            f"rows_per_batch={rows_per_batch} must be a positive multiple of block_rows="
            f"{dataset.block_rows}: batches are made of whole blocks. Pick a batch size that "
            f"is a multiple of {dataset.block_rows}, or build the store with rows_per_chunk "
            f"dividing the batch size"
        )
    return BlockLoader(
        dataset,
        batch_size=rows_per_batch // dataset.block_rows,
        sampler=BlockSampler(len(dataset), shuffle=shuffle, seed=seed),
        collate_fn=concat_blocks,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        drop_last=drop_last,
        pin_memory=pin_memory,
        # Its own generator: otherwise every new iterator draws its worker base seed from
        # the global torch RNG, shifting the dropout stream of a run resumed mid-epoch.
        generator=torch.Generator().manual_seed(seed),
    )
