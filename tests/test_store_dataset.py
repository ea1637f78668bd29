"""BlockDataset + make_block_loader: every row once per epoch, order fixed by (seed, epoch)."""

from __future__ import annotations

import pytest
import torch
from accelerate.data_loader import prepare_data_loader

from storage import (
    ActivationStore,
    BlockDataset,
    StoreSpec,
    StoreSpecError,
    make_block_loader,
)
from storage.synthetic import ROW_INDEX_OFFSET, build_synthetic_store, synthetic_rows

# 50 rows in chunks of 4: 13 blocks, the last one 2 rows
SPEC = StoreSpec(num_rows=50, seq_len=8, hidden_size=16, rows_per_chunk=4, chunks_per_shard=3)
ALL_ROWS = list(range(ROW_INDEX_OFFSET, ROW_INDEX_OFFSET + SPEC.num_rows))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    url = str(tmp_path_factory.mktemp("dataset") / "s")
    build_synthetic_store(url, SPEC, fingerprint={"weights": "w0"})
    return ActivationStore.open(url)


def epoch_rows(loader, epoch: int) -> list[list[int]]:
    loader.set_epoch(epoch)
    return [batch["row_index"].tolist() for batch in loader]


def test_items_are_chunk_aligned_blocks(store) -> None:
    ds = BlockDataset(store)
    assert (len(ds), ds.block_rows) == (13, 4)
    block = ds[3]
    want = synthetic_rows(SPEC, 12, 16)
    assert torch.equal(block["hidden"], want["hidden"]) and torch.equal(
        block["labels"], want["labels"]
    )
    assert ds[12]["row_index"].tolist() == ALL_ROWS[48:]  # short last block
    with pytest.raises(IndexError):
        ds[13]
    assert len(BlockDataset(store, block_rows=8)) == 7
    with pytest.raises(StoreSpecError, match="not a multiple of the store's rows_per_chunk=4"):
        BlockDataset(store, block_rows=6)


def test_in_memory_mode_matches_store_reads(store) -> None:
    disk, ram = BlockDataset(store, block_rows=8), BlockDataset(store, block_rows=6, in_memory=True)
    rows = lambda ds: {k: torch.cat([ds[i][k] for i in range(len(ds))]) for k in ds[0]}  # noqa: E731
    a, b = rows(disk), rows(ram)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_yields_every_row_once_per_epoch(store, num_workers: int) -> None:
    loader = make_block_loader(
        BlockDataset(store), rows_per_batch=12, shuffle=True, seed=7, num_workers=num_workers
    )
    first = epoch_rows(loader, 0)
    assert sorted(r for batch in first for r in batch) == ALL_ROWS
    assert len(first) == 5  # 13 blocks, 3 per batch
    assert epoch_rows(loader, 0) == first  # same seed and epoch: same order
    second = epoch_rows(loader, 1)
    assert second != first and sorted(r for b in second for r in b) == ALL_ROWS
    again = make_block_loader(BlockDataset(store), rows_per_batch=12, shuffle=True, seed=7)
    assert epoch_rows(again, 1) == second  # a fresh loader (another process) agrees
    other_seed = make_block_loader(BlockDataset(store), rows_per_batch=12, shuffle=True, seed=8)
    assert epoch_rows(other_seed, 0) != first


def test_unshuffled_loader_reads_in_order(store) -> None:
    loader = make_block_loader(BlockDataset(store), rows_per_batch=8, shuffle=False, seed=0)
    assert [r for b in epoch_rows(loader, 0) for r in b] == ALL_ROWS


def test_batches_are_whole_blocks(store) -> None:
    with pytest.raises(
        StoreSpecError, match="rows_per_batch=10 must be a positive multiple of block_rows=4"
    ):
        make_block_loader(BlockDataset(store), rows_per_batch=10, shuffle=True, seed=0)


def test_accelerate_prepare_gives_each_process_disjoint_blocks(tmp_path) -> None:
    """accelerate's own `prepare_data_loader`, once per simulated rank (real ranks:
    test_store_concurrency.py); 48 rows = 12 blocks = 6 batches, 3 per rank."""
    spec = StoreSpec(num_rows=48, seq_len=8, hidden_size=16, rows_per_chunk=4, chunks_per_shard=3)
    build_synthetic_store(str(tmp_path / "s"), spec, fingerprint={"weights": "w0"})
    ds = BlockDataset(ActivationStore.open(tmp_path / "s"))

    def rank_rows(rank: int, epoch: int, num_workers: int = 0) -> list[list[int]]:
        loader = make_block_loader(
            ds, rows_per_batch=8, shuffle=True, seed=5, num_workers=num_workers
        )
        prepared = prepare_data_loader(
            loader, num_processes=2, process_index=rank, put_on_device=False
        )
        return epoch_rows(prepared, epoch)

    for epoch in (0, 1):
        per_rank = [rank_rows(0, epoch), rank_rows(1, epoch, num_workers=2)]
        assert [len(b) for b in per_rank] == [3, 3]
        seen = [r for batches in per_rank for b in batches for r in b]
        assert sorted(seen) == list(range(ROW_INDEX_OFFSET, ROW_INDEX_OFFSET + 48))
        # interleaved, the ranks' batches are exactly the single-process order
        single = epoch_rows(make_block_loader(ds, rows_per_batch=8, shuffle=True, seed=5), epoch)
        assert [per_rank[i % 2][i // 2] for i in range(6)] == single
    assert rank_rows(0, 0) != rank_rows(0, 1)
