"""Encoding a whole uncompressed shard file in one pass, byte for byte as Zarr would.

Zarr 3.1.6 encodes a shard chunk by chunk through its async codec pipeline, at ~160 us
per inner chunk whatever the chunk's size: a 2,048-row shard of the tiny `attention_mask`
(256 chunks of 8 rows) took ~40 ms, as long as 16 MB of `hidden` (docs/cache-format.md,
"Writing"). For the chain a codec-"none" store uses, `[bytes, crc32c]` inside a shard
indexed at its end by `[bytes, crc32c]`, the file is simple enough to build directly:

    chunk 0 bytes + crc32c(chunk 0), chunk 1 ..., index (offset, nbytes) uint64 per
    chunk + crc32c(index)

(all little-endian, chunks in Morton order, which is row order here because only the
row axis has more than one chunk per shard). `encode_shard` returns None for any other
chain, and the caller writes through Zarr as before. The bytes are identical to Zarr's
(tests/test_store_roundtrip.py compares them), so readers, old stores and the format are
unchanged.
"""

from __future__ import annotations

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.bytes import Endian
from zarr.codecs.sharding import ShardingCodecIndexLocation

EMPTY = np.iinfo(np.uint64).max  # index entry of a chunk that is not in the file


def _little_endian(codec: object) -> bool:
    return isinstance(codec, BytesCodec) and codec.endian in (None, Endian.little)


def fast_path_applies(array: zarr.Array) -> bool:
    """True if `array`'s shards can be built by `encode_shard`: sharded along the first
    axis only, each inner chunk `[bytes (little-endian), crc32c]`, index at the end."""
    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return False
    shard = codecs[0]
    inner, index = tuple(shard.codecs), tuple(shard.index_codecs)
    return (
        np.dtype(array.dtype).byteorder in ("<", "=", "|")
        and len(inner) == 2
        and _little_endian(inner[0])
        and isinstance(inner[1], Crc32cCodec)
        and len(index) == 2
        and _little_endian(index[0])
        and isinstance(index[1], Crc32cCodec)
        and shard.index_location == ShardingCodecIndexLocation.end
        and tuple(shard.chunk_shape[1:]) == tuple(array.shape[1:])
        and tuple(array.metadata.chunk_grid.chunk_shape[1:]) == tuple(array.shape[1:])  # type: ignore[attr-defined]
    )


def encode_shard(
    values: np.ndarray, *, rows_per_chunk: int, chunks_per_shard: int, fill_value: object
) -> np.ndarray:
    """The bytes of one shard file holding `values` (its rows, possibly fewer than a
    shard's at the end of the array), as Zarr writes them with write_empty_chunks on."""
    rows = values.shape[0]
    nchunks = -(-rows // rows_per_chunk)
    if rows % rows_per_chunk:  # Zarr pads the array's last chunk with the fill value
        padded = np.full((nchunks * rows_per_chunk, *values.shape[1:]), fill_value, values.dtype)
        padded[:rows] = values
        values = padded
    flat = np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<"), copy=False)
    chunk_bytes = rows_per_chunk * flat[0].nbytes if rows else 0
    raw = flat.reshape(-1).view(np.uint8)
    stride = chunk_bytes + 4
    index_bytes = chunks_per_shard * 16
    out = np.empty(nchunks * stride + index_bytes + 4, np.uint8)
    body = out[: nchunks * stride].reshape(nchunks, stride)
    body[:, :chunk_bytes] = raw.reshape(nchunks, chunk_bytes)
    crcs = np.fromiter(
        (google_crc32c.value(raw[i * chunk_bytes : (i + 1) * chunk_bytes]) for i in range(nchunks)),
        dtype="<u4",
        count=nchunks,
    )
    body[:, chunk_bytes:] = crcs.view(np.uint8).reshape(nchunks, 4)
    index = np.full((chunks_per_shard, 2), EMPTY, dtype="<u8")
    index[:nchunks, 0] = np.arange(nchunks, dtype=np.uint64) * stride
    index[:nchunks, 1] = stride
    tail = out[nchunks * stride :]
    tail[:index_bytes] = index.reshape(-1).view(np.uint8)
    tail[index_bytes:] = np.frombuffer(
        np.uint32(google_crc32c.value(tail[:index_bytes])).astype("<u4").tobytes(), np.uint8
    )
    return out


def marker_chunk(value: int) -> bytes:
    """The file of one uint8 chunk of a single element under `[bytes, crc32c]`: a store's
    shard marker (storage/layout.py), without a trip through Zarr's codec pipeline."""
    raw = np.uint8(value).tobytes()
    return raw + np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes()
