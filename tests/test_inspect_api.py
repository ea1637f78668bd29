"""The notebook API: chunk-aligned blocks, read-ahead, rows as dicts, labelled views."""

from __future__ import annotations

import numpy as np
import pytest

from cached_mslt.inspect import (
    block_ranges,
    iter_blocks,
    iter_rows,
    labelled,
    read_block,
    to_numpy,
)
from storage import CorruptStoreError, StoreSpec
from tests.inspect_support import write_store

SPEC = StoreSpec(
    num_rows=30, seq_len=8, hidden_size=4, dtype="bfloat16", rows_per_chunk=4, chunks_per_shard=2
)


@pytest.fixture
def store(tmp_path):
    return write_store(tmp_path / "s", SPEC)


def test_blocks_cover_every_row_once_in_whole_chunks(store):
    for target in (1, 4 * SPEC.row_bytes, 1 << 30):
        ranges = block_ranges(store, target_bytes=target)
        assert [r for a, b in ranges for r in range(a, b)] == list(range(30))
        assert all(a % 4 == 0 for a, _ in ranges)
    assert len(block_ranges(store, target_bytes=8 * SPEC.row_bytes)) == 4  # 2 chunks each


def test_read_ahead_yields_what_direct_reads_give(store):
    ranges = block_ranges(store, target_bytes=1)
    pairs = zip(iter_blocks(store, ranges), iter_blocks(store, ranges, prefetch=False))
    for ahead, direct in pairs:
        for key, values in to_numpy(direct).items():
            np.testing.assert_array_equal(to_numpy(ahead)[key], values)


def test_stopping_early_does_not_hang(store):
    blocks = iter_blocks(store, block_ranges(store, target_bytes=1))
    next(blocks)
    blocks.close()  # the read-ahead thread is told to stop and joined


def test_read_errors_surface_in_the_consumer(store, tmp_path):
    data = bytearray((tmp_path / "s/hidden/c/2/0/0").read_bytes())
    data[10] ^= 0x01
    (tmp_path / "s/hidden/c/2/0/0").write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="crc32c"):
        for _ in iter_blocks(store, block_ranges(store, target_bytes=1)):
            pass


def test_numpy_blocks_widen_bfloat16_exactly(store):
    as_torch = read_block(store, 4, 12)
    as_numpy = read_block(store, 4, 12, numpy=True)
    assert as_numpy["hidden"].dtype == np.float32
    np.testing.assert_array_equal(as_numpy["hidden"], as_torch["hidden"].float().numpy())
    np.testing.assert_array_equal(as_numpy["row_index"], as_torch["row_index"].numpy())


def test_rows_iterate_like_a_dataset(store):
    rows = list(iter_rows(store))
    assert len(rows) == 30
    whole = read_block(store, 0, 30, numpy=True)
    for i in (0, 17, 29):
        assert rows[i]["row_index"] == whole["row_index"][i]
        np.testing.assert_array_equal(rows[i]["hidden"], whole["hidden"][i])
        assert rows[i]["hidden"].shape == (8, 4)


def test_labelled_view_selects_by_prepared_example(store):
    view = labelled(store, 8, 16)
    hidden = view["hidden"]
    assert hidden.dims == ("row", "token", "hidden") and hidden.values.shape == (8, 8, 4)
    example = int(hidden.coords["row_index"][3])
    one = hidden.sel(row_index=example)
    assert one.dims == ("token", "hidden")
    np.testing.assert_array_equal(one.values, read_block(store, 11, 12, numpy=True)["hidden"][0])
    token = one.sel(token=2)
    assert token.dims == ("hidden",) and token.values.shape == (4,)
    with pytest.raises(KeyError):
        hidden.sel(row_index=-5)
