"""What a store holds (`StoreSpec`) and how that maps onto Zarr dtypes, codecs and chunking."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from storage.errors import StoreSpecError

MiB = 1 << 20
TARGET_CHUNK_BYTES = 2 * MiB  # big enough for ~1.5 GB/s reads here, small enough to shuffle blocks
TARGET_SHARD_BYTES = 64 * MiB  # few files per store, and one write call per shard stays fast
# Derived layouts give a store of at least this many chunks at least this many shards, so
# a distributed build (shard s on process s % world_size) has work for up to 16 processes
# and the last shard, whose write overlaps nothing, is a small part of the writing. Not a
# function of the world size: a resume with another process count sees the same layout.
MIN_SHARDS = 16

# logical dtype -> (dtype stored in Zarr, torch dtype). Zarr 3.1.6 has no bfloat16
# (`dtype="bfloat16"` raises TypeError), so bfloat16 is kept as its raw bits in uint16.
# int8 (storage/int8.py): 8-bit values with a power-of-two scale per token, decoded
# exactly into bfloat16, the dtype its rows come back in.
DTYPES: dict[str, tuple[str, torch.dtype]] = {
    "float32": ("float32", torch.float32),
    "float16": ("float16", torch.float16),
    "bfloat16": ("uint16", torch.bfloat16),
    "int8": ("int8", torch.bfloat16),
}
CODECS = ("none", "zstd", "blosc")

# NaN, so hidden values never written are not plausible data (Zarr reads a missing
# chunk as the fill value). For bfloat16 the bits of its canonical NaN.
BFLOAT16_NAN_BITS = 0x7FC0


def _positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise StoreSpecError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class StoreSpec:
    """Shape, dtype, codec and chunking of one activation store.

    `rows_per_chunk` and `chunks_per_shard` left as None are derived from the target byte
    sizes (and `chunks_per_shard` capped so there are at least MIN_SHARDS shards when there
    are that many chunks); after construction both are always concrete ints (the resolved
    layout is what gets recorded in the store and compared on resume).
    """

    num_rows: int
    seq_len: int
    hidden_size: int
    dtype: str = "float16"
    codec: str = "none"
    rows_per_chunk: int | None = None
    chunks_per_shard: int | None = None
    target_chunk_bytes: int = field(default=TARGET_CHUNK_BYTES, compare=False, repr=False)
    target_shard_bytes: int = field(default=TARGET_SHARD_BYTES, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in (
            "num_rows",
            "seq_len",
            "hidden_size",
            "target_chunk_bytes",
            "target_shard_bytes",
        ):
            _positive_int(name, getattr(self, name))
        _positive_int("rows_per_chunk", self.rows_per_chunk, optional=True)
        _positive_int("chunks_per_shard", self.chunks_per_shard, optional=True)
        if self.dtype not in DTYPES:
            raise StoreSpecError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.codec not in CODECS:
            raise StoreSpecError(f"codec must be one of {list(CODECS)}, got {self.codec!r}")
        # Frozen dataclass: resolve the derived layout in place once.
        rows = self.rows_per_chunk or max(1, self.target_chunk_bytes // self.row_bytes)
        rows = min(int(rows), self.num_rows)
        object.__setattr__(self, "rows_per_chunk", rows)
        chunks_total = math.ceil(self.num_rows / rows)
        per_shard = self.chunks_per_shard or max(
            1, min(self.target_shard_bytes // (rows * self.row_bytes), chunks_total // MIN_SHARDS)
        )
        object.__setattr__(self, "chunks_per_shard", min(int(per_shard), chunks_total))

    @property
    def itemsize(self) -> int:
        return np.dtype(self.storage_dtype).itemsize

    @property
    def stored_width(self) -> int:
        """Values stored per token: H, and for int8 its exponent after them."""
        return self.hidden_size + (self.dtype == "int8")

    @property
    def row_bytes(self) -> int:
        """Bytes of `hidden` per row (the other arrays add about 5 bytes per token)."""
        return self.seq_len * self.stored_width * self.itemsize

    @property
    def rounding(self) -> torch.dtype | str:
        """What `round_to_store` takes: the torch dtype rows are rounded to, or "int8"."""
        return "int8" if self.dtype == "int8" else self.torch_dtype

    @property
    def rows_per_shard(self) -> int:
        return self.rows_per_chunk * self.chunks_per_shard  # type: ignore[operator]

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_rows / self.rows_per_shard)

    @property
    def storage_dtype(self) -> str:
        return DTYPES[self.dtype][0]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][1]

    @property
    def hidden_fill(self) -> float | int:
        """Fill value of `hidden`: NaN in the logical dtype (int8: -128, which no value uses)."""
        if self.dtype == "int8":
            return -128
        return BFLOAT16_NAN_BITS if self.dtype == "bfloat16" else float("nan")

    def compressors(self) -> list[BytesBytesCodec]:
        """Codec chain per chunk. crc32c goes last so it checks the bytes as stored on disk:
        without it a flipped byte decodes as wrong numbers, silently (docs/library-facts.md, zarr)."""
        compress: list[BytesBytesCodec] = {
            "none": [],
            "zstd": [ZstdCodec(level=1)],
            "blosc": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
        }[self.codec]
        return [*compress, Crc32cCodec()]

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as JSON (the byte targets only fed the resolution)."""
        d = asdict(self)
        del d["target_chunk_bytes"], d["target_shard_bytes"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreSpec:
        known = {"num_rows", "seq_len", "hidden_size", "dtype", "codec"}
        known |= {"rows_per_chunk", "chunks_per_shard"}
        unknown = set(d) - known
        if unknown:
            raise StoreSpecError(
                f"unknown StoreSpec fields {sorted(unknown)}; expected {sorted(known)}"
            )
        return cls(**d)
