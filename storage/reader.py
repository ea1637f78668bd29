"""Reading whole chunks of an uncompressed sharded array in one request, without Zarr's
per-chunk codec pipeline (docs/cache-format.md, "Reading fast").

For the layout `storage/shards.py` writes (and Zarr writes byte for byte): each inner chunk
is `raw bytes + crc32c`, in row order, with the shard's index of `(offset, nbytes)` pairs at
its end. A block of consecutive chunks of one shard is then one contiguous byte range:
`ChunkRanges` reads each shard's index once (a finished store never changes), asks for
the block's bytes in one request per shard it touches, checks every chunk's crc32c and
copies the payloads straight into the caller's array: one copy, no Python per row. Any
surprise (a chunk absent from the index, chunks out of order, a checksum that fails, a
missing file) raises `FastReadError`, and the caller reads through Zarr, which names the
problem (`ActivationStore.read_blocks`).
"""

from __future__ import annotations

import asyncio
import math

import google_crc32c
import numpy as np
from zarr.abc.store import RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype

from storage.shards import EMPTY

INDEX_ENTRY = 16  # (offset, nbytes) as two little-endian uint64
CRC = 4


class FastReadError(Exception):
    """The bytes were not what the one-request path expects: read through Zarr instead."""


class ChunkRanges:
    """Direct reads of row ranges of one uncompressed, row-sharded array of a finished store."""

    def __init__(self, store: Store, name: str, array) -> None:
        self.store, self.name = store, name
        self.shape, self.dtype = tuple(array.shape), np.dtype(array.dtype)
        self.rows_per_chunk = array.chunks[0]
        self.chunks_per_shard = array.shards[0] // self.rows_per_chunk
        self.rows_per_shard = array.shards[0]
        self.row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        self.chunk_bytes = self.rows_per_chunk * self.row_bytes
        self._encode = array.metadata.encode_chunk_key
        self._index: dict[int, np.ndarray] = {}

    def key(self, shard: int) -> str:
        return f"{self.name}/{self._encode((shard,) + (0,) * (len(self.shape) - 1))}"

    async def _shard_index(self, shard: int) -> np.ndarray:
        if shard not in self._index:
            size = self.chunks_per_shard * INDEX_ENTRY + CRC
            raw = await self.store.get(
                self.key(shard), default_buffer_prototype(), SuffixByteRequest(size)
            )
            if raw is None or len(raw) != size:
                raise FastReadError(f"{self.key(shard)}: no shard index")
            raw = raw.to_bytes()
            if google_crc32c.value(raw[:-CRC]) != int.from_bytes(raw[-CRC:], "little"):
                raise FastReadError(f"{self.key(shard)}: shard index checksum")
            self._index[shard] = np.frombuffer(raw[:-CRC], "<u8").reshape(-1, 2)
        return self._index[shard]

    async def _read_part(self, shard: int, first: int, last: int, out: np.ndarray) -> None:
        """Chunks [first, last) of `shard` (indices inside it) into `out`'s rows."""
        index = await self._shard_index(shard)
        offsets, sizes = index[first:last, 0], index[first:last, 1]
        stride = self.chunk_bytes + CRC
        if (sizes == EMPTY).any() or (sizes != stride).any() or (np.diff(offsets) != stride).any():
            raise FastReadError(f"{self.key(shard)}: chunks {first}..{last} not contiguous")
        start = int(offsets[0])
        raw = await self.store.get(
            self.key(shard),
            default_buffer_prototype(),
            RangeByteRequest(start, start + stride * (last - first)),
        )
        if raw is None or len(raw) != stride * (last - first):
            raise FastReadError(f"{self.key(shard)}: short read")
        chunks = np.frombuffer(raw.as_buffer_like(), np.uint8).reshape(last - first, stride)
        for i in range(last - first):
            crc = int.from_bytes(chunks[i, self.chunk_bytes :].tobytes(), "little")
            if google_crc32c.value(chunks[i, : self.chunk_bytes]) != crc:
                raise FastReadError(f"{self.key(shard)}: chunk {first + i} checksum")
        # one strided copy: every chunk's payload, skipping the checksums between them
        out.reshape(-1).view(np.uint8).reshape(last - first, -1)[:] = chunks[:, : self.chunk_bytes]

    def _parts(self, start: int, stop: int):
        """(shard, first chunk, last chunk, row offset into the block, rows) per shard."""
        rpc, rps = self.rows_per_chunk, self.rows_per_shard
        row = start
        while row < stop:
            shard = row // rps
            end = min(stop, (shard + 1) * rps)
            first = (row - shard * rps) // rpc
            last = math.ceil((end - shard * rps) / rpc)
            yield shard, first, last, row - start, end - row
            row = end

    async def read(self, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        """Rows [start, stop) of every range, each range starting on a chunk boundary."""
        outs, jobs = [], []
        for start, stop in ranges:
            if start % self.rows_per_chunk:
                raise FastReadError(f"rows {start}.. do not start a chunk")
            out = np.empty((stop - start, *self.shape[1:]), self.dtype)
            outs.append(out)
            for shard, first, last, at, rows in self._parts(start, stop):
                jobs.append(self._into(shard, first, last, out[at : at + rows]))
        await asyncio.gather(*jobs)
        return outs

    async def _into(self, shard: int, first: int, last: int, out: np.ndarray) -> None:
        full = (last - first) * self.rows_per_chunk
        if full == len(out):
            return await self._read_part(shard, first, last, out)
        # the array's last chunk is padded to a whole chunk on disk
        padded = np.empty((full, *self.shape[1:]), self.dtype)
        await self._read_part(shard, first, last, padded)
        out[:] = padded[: len(out)]
