"""Damaged stores are reported, never read back as zeros, NaN or wrong numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage import (
    ActivationStore,
    CorruptStoreError,
    IncompleteStoreError,
    StoreSpec,
)
from storage.synthetic import build_synthetic_store

FP = {"weights": "w0"}
# 3 shards of 8 rows, 4 rows per chunk; float32 so a flipped byte cannot hide in a NaN
SPEC = StoreSpec(
    num_rows=24, seq_len=8, hidden_size=16, dtype="float32", rows_per_chunk=4, chunks_per_shard=2
)


@pytest.fixture
def store_dir(tmp_path) -> Path:
    build_synthetic_store(str(tmp_path / "s"), SPEC, fingerprint=FP)
    return tmp_path / "s"


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "array, shard_file, offset, chunk, rows",
    [
        # shard 1 holds chunks 2 and 3; byte 10 lies in the first one stored
        ("hidden", "hidden/c/1/0/0", 10, "(2, 0, 0)", "rows 8-12"),
        ("labels", "labels/c/2/0", 10, "(4, 0)", "rows 16-20"),
    ],
)
def test_flipped_byte_names_array_and_chunk(
    store_dir: Path, array, shard_file, offset, chunk, rows
) -> None:
    flip_byte(store_dir / shard_file, offset)
    reader = ActivationStore.open(store_dir)  # files present: open succeeds
    reader.read_rows(0, 8)  # other shards still read
    with pytest.raises(CorruptStoreError) as err:
        reader.read_rows(0, SPEC.num_rows)
    msg = str(err.value)
    assert f"array {array!r} chunk {chunk} ({rows}, in shard file {shard_file})" in msg
    assert "crc32c" in msg and "rebuild" in msg


def test_flipped_byte_in_shard_index_is_reported(store_dir: Path) -> None:
    flip_byte(store_dir / "hidden/c/0/0/0", -3)  # the index sits at the end of the shard
    with pytest.raises(CorruptStoreError, match=r"array 'hidden' chunk \(0, 0, 0\)"):
        ActivationStore.open(store_dir).read_rows(0, 4)


@pytest.mark.parametrize("damage", ["delete", "empty", "truncate"])
def test_missing_shard_file_is_reported_at_open(store_dir: Path, damage: str) -> None:
    path = store_dir / "hidden/c/1/0/0"
    if damage == "delete":
        path.unlink()
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(path.read_bytes()[:100])
    if damage == "truncate":  # present, so only the read can tell (checksum)
        with pytest.raises(CorruptStoreError, match="hidden"):
            ActivationStore.open(store_dir).read_rows(8, 16)
        return
    with pytest.raises(
        CorruptStoreError, match=r"shard files are missing or empty: hidden/c/1/0/0\."
    ):
        ActivationStore.open(store_dir)


@pytest.mark.parametrize("damage", ["delete", "empty"])
def test_shard_lost_after_open_is_reported_at_read(store_dir: Path, damage: str) -> None:
    reader = ActivationStore.open(store_dir)
    path = store_dir / "row_index/c/2"
    path.unlink() if damage == "delete" else path.write_bytes(b"")
    with pytest.raises(
        CorruptStoreError, match=r"array 'row_index' shard file row_index/c/2 \(rows 16-24\)"
    ):
        reader.read_rows(12, 20)


def test_commit_clears_markers_of_shards_with_missing_files(tmp_path) -> None:
    store = build_synthetic_store(str(tmp_path / "s"), SPEC, fingerprint=FP, commit=False)
    (tmp_path / "s/labels/c/1/0").unlink()
    with pytest.raises(IncompleteStoreError, match=r"labels/c/1/0\. Their markers were cleared"):
        store.commit()
    assert store.pending_shards(0, 1) == [1]  # a resumed build rewrites it
    assert not store.is_complete
