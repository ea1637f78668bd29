"""Round trips: every dtype bit-exact under every codec, every kind of location, plain-Zarr reads."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
import zarr

from storage import ActivationStore, StoreSpec
from storage.synthetic import build_synthetic_store, synthetic_rows

FP = {"weights": "w0", "data": "d0"}
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def small_spec(**kw) -> StoreSpec:
    # 37 rows: the last chunk and the last shard are both short.
    return StoreSpec(
        **{
            "num_rows": 37,
            "seq_len": 8,
            "hidden_size": 16,
            "rows_per_chunk": 4,
            "chunks_per_shard": 2,
            **kw,
        }
    )


def special_values(hidden: torch.Tensor) -> torch.Tensor:
    """Put the values a careless round trip loses into the first row (finite ones: a store
    refuses NaN and inf, docs/design.md invariant 8)."""
    out = hidden.clone()
    specials = torch.tensor([-0.0, 0.0, 1e-40, -65504.0, 65504.0, 6e-8, -6e-8])
    out[0, 0, : len(specials)] = specials.to(hidden.dtype)
    return out


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.view(INT_VIEW[got.dtype]), want.view(INT_VIEW[want.dtype]))


@pytest.mark.parametrize("codec", ["none", "zstd", "blosc"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_bit_exact(tmp_path, dtype: str, codec: str) -> None:
    spec = small_spec(dtype=dtype, codec=codec)
    store = ActivationStore.create(tmp_path / "s", spec, fingerprint=FP)
    written = {}
    for shard in range(store.num_shards):
        start, stop = store.shard_rows(shard)
        rows = synthetic_rows(spec, start, stop)
        if shard == 0:
            rows["hidden"] = special_values(rows["hidden"])
        store.write_shard(shard, **rows)
        written[shard] = rows
    store.commit()

    reader = ActivationStore.open(tmp_path / "s", expected_fingerprint=FP)
    got = reader.read_rows(0, spec.num_rows)
    want = {k: torch.cat([written[s][k] for s in sorted(written)]) for k in got}
    assert_bit_equal(got["hidden"], want["hidden"])
    assert torch.signbit(got["hidden"][0, 0, 0])  # -0.0 keeps its sign
    for key in ("attention_mask", "labels", "row_index"):
        assert got[key].dtype == torch.long
        assert torch.equal(got[key], want[key])
    # an unaligned slice reads the same rows
    assert_bit_equal(reader.read_rows(5, 23)["hidden"], want["hidden"][5:23])


def test_numpy_inputs_are_accepted(tmp_path) -> None:
    spec = small_spec(num_rows=8, dtype="float16")
    store = ActivationStore.create(tmp_path / "s", spec, fingerprint=FP)
    rows = synthetic_rows(spec, 0, 8)
    store.write_shard(0, **{k: v.numpy() for k, v in rows.items()})
    store.commit()
    assert_bit_equal(ActivationStore.open(tmp_path / "s").read_rows(0, 8)["hidden"], rows["hidden"])


@pytest.mark.parametrize("kind", ["path", "file_url", "memory_url"])
def test_locations_behave_like_a_path(tmp_path, kind: str) -> None:
    url = {
        "path": str(tmp_path / "s"),
        "file_url": (tmp_path / "s").as_uri(),
        "memory_url": f"memory://store-tests/{uuid.uuid4().hex}",
    }[kind]
    spec = small_spec(dtype="bfloat16")
    build_synthetic_store(url, spec, fingerprint=FP)
    reader = ActivationStore.open(url, expected_fingerprint=FP)
    assert reader.is_complete and reader.attrs["logical_dtype"] == "bfloat16"
    want = synthetic_rows(spec, 0, spec.num_rows)
    got = reader.read_rows(0, spec.num_rows)
    assert_bit_equal(got["hidden"], want["hidden"])
    assert torch.equal(got["row_index"], want["row_index"])
    if kind == "file_url":
        assert (tmp_path / "s" / "hidden" / "zarr.json").exists()


def test_attrs_record_the_build(tmp_path) -> None:
    spec = small_spec(codec="zstd")
    store = ActivationStore.create(
        tmp_path / "s", spec, fingerprint=FP, attrs={"stage": 2, "masking_seed": 5}
    )
    attrs = store.attrs
    assert attrs["complete"] is False and attrs["format_version"] == 2
    assert attrs["spec"] == spec.to_dict() and attrs["fingerprint"] == FP
    assert (attrs["stage"], attrs["masking_seed"]) == (2, 5)
    assert attrs["num_shards"] == store.num_shards == 5
    assert not (tmp_path / "s" / "shard_done" / "c").exists()  # no marker before a write
    with pytest.raises(ValueError, match="reserved keys"):
        ActivationStore.create(tmp_path / "t", spec, fingerprint=FP, attrs={"complete": True})


def test_plain_zarr_and_numpy_can_read_a_store(tmp_path) -> None:
    """What docs/cache-format.md tells readers without this package to do."""
    spec = small_spec(dtype="bfloat16", codec="blosc")
    build_synthetic_store(str(tmp_path / "s"), spec, fingerprint=FP)
    group = zarr.open_group(str(tmp_path / "s"), mode="r")
    assert group.attrs["complete"] is True and group.attrs["logical_dtype"] == "bfloat16"
    u = group["hidden"][:]
    assert u.dtype == np.uint16
    as_f32 = (u.astype(np.uint32) << 16).view(np.float32)
    want = synthetic_rows(spec, 0, spec.num_rows)
    np.testing.assert_array_equal(as_f32, want["hidden"].float().numpy())
    assert group["shard_done"][:].tolist() == [1] * spec.num_shards
    np.testing.assert_array_equal(group["labels"][:], want["labels"].numpy())


def test_format_version_1_stores_still_read(tmp_path) -> None:
    spec = small_spec()
    build_synthetic_store(str(tmp_path / "s"), spec, fingerprint=FP)
    zarr.open_group(str(tmp_path / "s"), mode="r+").attrs["format_version"] = 1
    store = ActivationStore.open(tmp_path / "s", expected_fingerprint=FP)
    assert_bit_equal(store.read_rows(0, 37)["hidden"], synthetic_rows(spec, 0, 37)["hidden"])


def test_a_partly_filled_store_reads_its_present_units_plain_zarr_too(tmp_path) -> None:
    """A write-through store holds only the units its stage read (docs/cache-format.md):
    present units are the set markers, read by this package or by plain zarr."""
    spec = small_spec(chunks_per_shard=1)
    store = ActivationStore.create(tmp_path / "s", spec, fingerprint=FP)
    for unit in (1, 3):
        store.write_shard(unit, **synthetic_rows(spec, *store.shard_rows(unit)))
    assert store.shards_done() == [1, 3]
    reader = ActivationStore.open(tmp_path / "s", require_complete=False)
    a, b = reader.shard_rows(3)
    assert_bit_equal(reader.read_hidden(a, b), synthetic_rows(spec, a, b)["hidden"])
    group = zarr.open_group(str(tmp_path / "s"), mode="r")
    present = np.flatnonzero(group["shard_done"][:]).tolist()
    assert present == [1, 3] and group.attrs["complete"] is False


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_read_hidden_is_read_rows_hidden(tmp_path, dtype) -> None:
    spec = small_spec(dtype=dtype)
    store = build_synthetic_store(str(tmp_path / "s"), spec, fingerprint=FP)
    for start, stop in ((0, 37), (4, 12), (33, 37), (5, 5)):
        assert_bit_equal(store.read_hidden(start, stop), store.read_rows(start, stop)["hidden"])
    with pytest.raises(IndexError):
        store.read_hidden(0, 38)


@pytest.mark.parametrize("rows", [37, 3])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_one_pass_shard_encoding_writes_zarrs_bytes(tmp_path, monkeypatch, dtype, rows) -> None:
    """storage/shards.py builds an uncompressed store's shard files and markers itself:
    every file is byte-identical to what Zarr writes for the same rows (short last chunk
    and shard included), so readers and the format cannot tell the difference."""
    import storage.store

    spec = small_spec(dtype=dtype, num_rows=rows)
    fast = build_synthetic_store(str(tmp_path / "fast"), spec, fingerprint=FP, commit=False)
    assert fast._fast_arrays == {"hidden", "attention_mask", "labels", "row_index"}
    monkeypatch.setattr(storage.store, "fast_path_applies", lambda array: False)
    slow = build_synthetic_store(str(tmp_path / "zarr"), spec, fingerprint=FP, commit=False)
    assert slow._fast_arrays == set()

    def chunk_files(root):
        return sorted(p.relative_to(root) for p in root.rglob("c/**/*") if p.is_file())

    files = chunk_files(tmp_path / "zarr")
    assert chunk_files(tmp_path / "fast") == files
    assert len(files) == 5 * spec.num_shards  # four row arrays and the marker
    for f in files:
        assert (tmp_path / "fast" / f).read_bytes() == (tmp_path / "zarr" / f).read_bytes(), f
    fast.commit()
    assert_bit_equal(
        ActivationStore.open(tmp_path / "fast").read_rows(0, rows)["hidden"],
        synthetic_rows(spec, 0, rows)["hidden"],
    )


@pytest.mark.parametrize("codec", ["zstd", "blosc"])
def test_compressed_stores_are_written_through_zarr(tmp_path, codec) -> None:
    store = ActivationStore.create(tmp_path / "s", small_spec(codec=codec), fingerprint=FP)
    assert store._fast_arrays == set()
