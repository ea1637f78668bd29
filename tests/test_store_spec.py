"""StoreSpec validation and chunk sizing; fingerprint helpers."""

from __future__ import annotations

import pytest
import torch

from storage import (
    StoreSpec,
    StoreSpecError,
    fingerprint_dict,
    fingerprint_file_tree,
    fingerprint_module,
)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_rows": 0}, "num_rows must be a positive int"),
        ({"seq_len": -1}, "seq_len must be a positive int"),
        ({"hidden_size": 2.5}, "hidden_size must be a positive int"),
        ({"dtype": "float64"}, "dtype must be one of"),
        ({"codec": "gzip"}, "codec must be one of"),
        ({"rows_per_chunk": 0}, "rows_per_chunk must be a positive int"),
        ({"chunks_per_shard": True}, "chunks_per_shard must be a positive int"),
    ],
)
def test_spec_rejects_invalid_fields(kwargs: dict, match: str) -> None:
    base = {"num_rows": 10, "seq_len": 8, "hidden_size": 4}
    with pytest.raises(StoreSpecError, match=match):
        StoreSpec(**{**base, **kwargs})


def test_spec_derives_chunking_from_target_bytes() -> None:
    # bert-base rows in float16: 128 * 768 * 2 = 192 KiB -> 10 rows per ~2 MiB chunk
    spec = StoreSpec(num_rows=100_000, seq_len=128, hidden_size=768)
    assert spec.rows_per_chunk == 10
    assert spec.rows_per_shard * spec.row_bytes <= 64 << 20
    assert spec.num_shards == -(-100_000 // spec.rows_per_shard)
    # tiny: 128 * 128 * 4 = 64 KiB per float32 row -> 32 rows per chunk
    assert (
        StoreSpec(num_rows=1000, seq_len=128, hidden_size=128, dtype="float32").rows_per_chunk == 32
    )


def test_derived_layouts_have_at_least_16_shards_when_there_are_16_chunks() -> None:
    # tiny, 4,096 rows of 8-row chunks (256 KiB): 512 chunks; 64 MiB shards would make 2.
    spec = StoreSpec(num_rows=4096, seq_len=128, hidden_size=128, rows_per_chunk=8)
    assert (spec.chunks_per_shard, spec.num_shards) == (32, 16)
    # 17..31 chunks: one chunk per shard; 20 rows in 4-row chunks: 5 shards of 1 chunk.
    for rows, shards in ((68, 17), (124, 31), (128, 16), (20, 5)):
        spec = StoreSpec(num_rows=rows, seq_len=4, hidden_size=4, rows_per_chunk=4)
        assert spec.num_shards == shards, rows
    # Large stores keep the 64 MiB bound; an explicit chunks_per_shard is kept as given.
    big = StoreSpec(num_rows=1_000_000, seq_len=128, hidden_size=128, rows_per_chunk=8)
    assert big.rows_per_shard * big.row_bytes == 64 << 20
    explicit = StoreSpec(
        num_rows=4096, seq_len=128, hidden_size=128, rows_per_chunk=8, chunks_per_shard=256
    )
    assert explicit.num_shards == 2
    assert StoreSpec.from_dict(explicit.to_dict()) == explicit  # old stores' recorded layout


def test_spec_clamps_layout_to_small_stores() -> None:
    spec = StoreSpec(num_rows=3, seq_len=4, hidden_size=4)
    assert (spec.rows_per_chunk, spec.chunks_per_shard, spec.num_shards) == (3, 1, 1)
    spec = StoreSpec(num_rows=10, seq_len=4, hidden_size=4, rows_per_chunk=4, chunks_per_shard=100)
    assert spec.chunks_per_shard == 3


def test_spec_round_trips_through_dict() -> None:
    spec = StoreSpec(num_rows=50, seq_len=8, hidden_size=4, dtype="bfloat16", codec="zstd")
    assert StoreSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(StoreSpecError, match="unknown StoreSpec fields"):
        StoreSpec.from_dict({**spec.to_dict(), "bogus": 1})


def _module(seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    m.register_buffer("steps", torch.tensor([7]), persistent=False)
    return m.to(dtype)


def test_fingerprint_module_depends_on_values_dtype_and_buffers() -> None:
    assert fingerprint_module(_module(0)) == fingerprint_module(_module(0))
    assert fingerprint_module(_module(0)) != fingerprint_module(_module(1))
    assert fingerprint_module(_module(0)) != fingerprint_module(_module(0, torch.bfloat16))
    m = _module(0)
    m.steps += 1  # a non-persistent buffer still changes the output, so the hash
    assert fingerprint_module(m) != fingerprint_module(_module(0))


def test_fingerprint_module_is_bfloat16_exact() -> None:
    a, b = _module(0, torch.bfloat16), _module(0, torch.bfloat16)
    with torch.no_grad():
        a[0].bias[0], b[0].bias[0] = 0.0, -0.0  # equal as numbers, different bits
    assert fingerprint_module(a) != fingerprint_module(b)


def test_fingerprint_file_tree_is_content_only(tmp_path) -> None:
    def tree(root, files):
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        return fingerprint_file_tree(root)

    files = {"a.arrow": b"xyz", "sub/b.json": b"{}", "sub/c": b""}
    first = tree(tmp_path / "one", files)
    assert tree(tmp_path / "two", dict(reversed(files.items()))) == first
    assert tree(tmp_path / "moved", {"a.arrow": b"xyz", "sub/b.json": b"", "sub/c": b"{}"}) != first
    assert (
        tree(tmp_path / "renamed", {"A.arrow": b"xyz", "sub/b.json": b"{}", "sub/c": b""}) != first
    )
    with pytest.raises(FileNotFoundError):
        fingerprint_file_tree(tmp_path / "absent")


def test_fingerprint_dict_is_canonical() -> None:
    assert fingerprint_dict({"a": 1, "b": [1, 2]}) == fingerprint_dict({"b": [1, 2], "a": 1})
    assert fingerprint_dict({"a": 1}) != fingerprint_dict({"a": "1"})
    with pytest.raises(ValueError):
        fingerprint_dict({"a": float("nan")})
