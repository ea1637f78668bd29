"""The 8-bit store (docs/cache-format.md, "8-bit stores") and the one-request block read
(docs/cache-format.md, "Reading fast")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from storage import (
    ActivationStore,
    CorruptStoreError,
    NonFiniteActivationsError,
    StoreSpec,
    round_to_store,
    synthetic_rows,
)
from storage.int8 import encode


def write_store(path, spec: StoreSpec, hidden: torch.Tensor) -> ActivationStore:
    rows = synthetic_rows(
        StoreSpec(spec.num_rows, spec.seq_len, spec.hidden_size), 0, spec.num_rows
    )
    rows["hidden"] = hidden
    store = ActivationStore.create(path, spec, fingerprint={"test": "int8"})
    for shard in range(store.num_shards):
        a, b = store.shard_rows(shard)
        store.write_shard(shard, **{k: v[a:b] for k, v in rows.items()})
    store.commit()
    return ActivationStore.open(path)


def wide_range_rows(n=40, t=16, h=8) -> torch.Tensor:
    x = torch.randn(n, t, h, generator=torch.Generator().manual_seed(0))
    x = x * torch.logspace(-4, 4, n)[:, None, None]
    x[0, 0] = 0  # an all-zero token
    x[1, 1, 3] = 1e3  # an outlier dimension
    return x


def test_int8_rounding_is_idempotent_and_within_half_a_step():
    x = wide_range_rows()
    once = round_to_store(x, "int8")
    assert once.dtype == torch.bfloat16
    assert np.array_equal(encode(once), encode(x))  # a rounded row re-encodes to the same bytes
    absmax = x.abs().amax(-1, keepdim=True)
    assert ((once.float() - x).abs() <= absmax / 127 + 1e-30).all()  # step <= 2 absmax / 127


def test_int8_store_round_trips_and_plain_zarr_decodes_it(tmp_path):
    spec = StoreSpec(40, 16, 8, dtype="int8", rows_per_chunk=8, chunks_per_shard=2)
    x = wide_range_rows()
    store = write_store(tmp_path / "s", spec, x)
    read = store.read_blocks([(0, 40)])[0]["hidden"]
    assert torch.equal(read, round_to_store(x, "int8"))
    assert torch.equal(store.read_rows(8, 24)["hidden"], read[8:24])
    g = zarr.open_group(tmp_path / "s", mode="r")
    assert g.attrs["logical_dtype"] == "int8" and g["hidden"].shape == (40, 16, 9)
    u = g["hidden"][:]  # the decode docs/cache-format.md gives, numpy only
    plain = u[..., :-1].astype(np.float32) * np.exp2(u[..., -1:].astype(np.float32))
    assert np.array_equal(plain, read.float().numpy())
    assert spec.row_bytes == 16 * 9  # about half of float16's 16 * 8 * 2


def test_int8_store_refuses_non_finite_rows(tmp_path):
    spec = StoreSpec(8, 16, 8, dtype="int8", rows_per_chunk=8)
    store = ActivationStore.create(tmp_path / "s", spec, fingerprint={"test": "int8"})
    rows = synthetic_rows(StoreSpec(8, 16, 8), 0, 8)
    rows["hidden"] = rows["hidden"].float()
    rows["hidden"][3, 2, 1] = float("nan")
    with pytest.raises(NonFiniteActivationsError, match="row 3"):
        store.write_shard(0, **rows)
    assert not store.is_shard_done(0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int8"])
def test_one_request_block_reads_equal_zarr_reads(tmp_path, dtype):
    # 37 rows: a short last chunk and a short last shard; blocks that span shards
    spec = StoreSpec(37, 16, 8, dtype=dtype, rows_per_chunk=4, chunks_per_shard=3)
    x = wide_range_rows(37)
    store = write_store(tmp_path / "s", spec, x.to(spec.torch_dtype) if dtype != "int8" else x)
    ranges = [(0, 4), (8, 28), (36, 37), (0, 37)]
    assert store._read_direct(ranges) is not None  # the one-request path applies here
    fast = store.read_blocks(ranges)
    for (a, b), block in zip(ranges, fast, strict=True):
        slow = store._read_arrays(("hidden",), a, b)["hidden"]  # through Zarr
        assert torch.equal(block["hidden"].view(torch.uint8), slow.view(torch.uint8))


def test_one_request_read_of_a_corrupt_chunk_names_it(tmp_path):
    spec = StoreSpec(16, 16, 8, rows_per_chunk=8, chunks_per_shard=2)
    write_store(tmp_path / "s", spec, wide_range_rows(16).half())
    shard = tmp_path / "s" / "hidden" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    store = ActivationStore.open(tmp_path / "s")
    with pytest.raises(CorruptStoreError, match=r"chunk \(0, 0, 0\)"):
        store.read_blocks([(0, 8)])
