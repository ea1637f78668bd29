"""Where a store lives: URL -> Zarr `Store`, and the store-level guards Zarr 3.1.6 lacks."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from zarr.abc.store import ByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, WrapperStore

# Zarr's LocalStore writes each file to "<name>.<uuid hex>.partial" and then renames it.
# A writer killed mid-write leaves that temporary file behind.
PARTIAL_SUFFIX = ".partial"


def open_zarr_store(
    url: str | os.PathLike[str], *, read_only: bool, storage_options: dict[str, Any] | None = None
) -> Store:
    """A plain path or `file://` URL -> LocalStore; any other URL -> fsspec, with
    `storage_options` (endpoint, region, credentials...) passed to its filesystem.

    `file://` goes to LocalStore rather than fsspec on purpose: LocalStore writes through a
    temporary file and a rename (a killed writer never leaves a half-written shard under
    its real name), creates parent directories (fsspec's local filesystem needs
    `auto_mkdir`), and makes `set_if_not_exists` atomic, which the build lock relies on.
    """
    text = os.fspath(url)
    if "://" not in text:
        return LocalStore(Path(text), read_only=read_only)
    parsed = urlparse(text)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(
                f"{text}: file:// URLs must be absolute (file:///path), got host {parsed.netloc!r}"
            )
        return LocalStore(Path(parsed.path), read_only=read_only)
    return FsspecStore.from_url(text, read_only=read_only, storage_options=storage_options)


def is_local(store: Store) -> bool:
    return isinstance(store, LocalStore)


def get_bytes(store: Store, key: str) -> bytes | None:
    """The file at `key`, or None if there is none; a local file is read directly (a
    writer checks the root metadata before every unit it writes)."""
    if is_local(store):
        try:
            return (store.root / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
    try:
        buf = sync(store.get(key, default_buffer_prototype()))
    except FileNotFoundError:  # a read-only LocalStore whose directory does not exist
        return None
    return None if buf is None else buf.to_bytes()


def put_files(store: Store, files: dict[str, Buffer], last: tuple[str, Buffer]) -> None:
    """Write `files`, then `last` once they all are (a shard's marker). A local store is
    written from the calling thread, each file through a temporary name and a rename as
    LocalStore does: a write-through unit is five small files, and handing each to Zarr's
    event loop and its thread pool cost three times the file system calls themselves
    (docs/cache-format.md, "Writing"). Other stores get every file's request at once."""
    if is_local(store):
        for key, value in [*files.items(), last]:
            _put_local(store.root / key, value)
        return

    async def put_all() -> None:
        await asyncio.gather(*(store.set(key, value) for key, value in files.items()))
        await store.set(*last)

    sync(put_all())


def _put_local(path: Path, value: Buffer) -> None:
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
    try:
        try:
            f = partial.open("wb")
        except FileNotFoundError:  # the shard's first file: its directories are new
            path.parent.mkdir(parents=True, exist_ok=True)
            f = partial.open("wb")
        with f:
            f.write(value.as_buffer_like())
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


class MissingChunkError(FileNotFoundError):
    """A chunk or shard file that must exist is absent or empty."""

    def __init__(self, key: str) -> None:
        super().__init__(f"chunk file {key!r} is missing or empty")
        self.key = key


class StrictStore(WrapperStore[Store]):
    """Read-side wrapper that raises on missing chunk data instead of inventing it.

    Zarr 3.1.6 reads a deleted shard, and also a 0-byte shard file, as the fill value with
    no error and no option to raise (docs/library-facts.md, zarr). Every chunk key under `<array>/c/`
    that the store cannot deliver (None, or no bytes) raises `MissingChunkError` here.
    """

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        value = await self._store.get(key, prototype, byte_range)
        if "/c/" in key and (value is None or len(value) == 0):
            raise MissingChunkError(key)
        return value


class ShardIndexCache(WrapperStore[Store]):
    """Read-side wrapper that keeps shard indexes of a finished (immutable) store.

    Zarr reads a chunk inside a shard as two requests: the shard's index (a suffix byte
    range) and then the chunk. On an object store each is a round trip, and the server's
    per-request cost, not bandwidth, limits the block loader (docs/cache-format.md). Index
    reads are answered from a bounded LRU after the first; only suffix requests are
    cached, which in this store are exactly the index reads (index at the shard's end).
    """

    def __init__(self, store: Store, max_entries: int = 16384) -> None:
        super().__init__(store)
        self._indexes: OrderedDict[tuple[str, int], Buffer | None] = OrderedDict()
        self._max_entries = max_entries

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        if not isinstance(byte_range, SuffixByteRequest):
            return await self._store.get(key, prototype, byte_range)
        slot = (key, byte_range.suffix)
        if slot in self._indexes:
            self._indexes.move_to_end(slot)
            return self._indexes[slot]
        value = await self._store.get(key, prototype, byte_range)
        if value is not None and len(value):
            self._indexes[slot] = value
            if len(self._indexes) > self._max_entries:
                self._indexes.popitem(last=False)
        return value


def key_sizes(store: Store, keys: Iterable[str]) -> dict[str, int | None]:
    """Size in bytes of each key, None where it does not exist (one concurrent round trip)."""
    keys = list(keys)

    async def size(key: str) -> int | None:
        try:
            return await store.getsize(key)
        except FileNotFoundError:
            return None

    async def all_sizes() -> list[int | None]:
        return await asyncio.gather(*(size(k) for k in keys))

    return dict(zip(keys, sync(all_sizes()), strict=True))


def list_keys(store: Store, prefix: str = "") -> list[str]:
    async def collect() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    return sync(collect())


def delete_keys(store: Store, keys: Iterable[str]) -> None:
    async def delete_all() -> Any:
        return await asyncio.gather(*(store.delete(k) for k in keys))

    sync(delete_all())
