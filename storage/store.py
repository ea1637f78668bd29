"""`ActivationStore`: one Zarr v3 group of cached hidden states (docs/cache-format.md).

Build protocol (docs/design.md, "Store layout and build protocol"): rank 0 calls `create` (takes the
build lock), every rank then `open(mode="r+")`s it and writes `pending_shards(rank,
world)`, each shard whole, then marks it done; after a barrier rank 0 calls `commit`,
which checks every marker and every shard file and only then sets `complete`.
Readers `open` with mode "r", which refuses anything incomplete, stale or damaged.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from storage.backend import (
    PARTIAL_SUFFIX,
    MissingChunkError,
    ShardIndexCache,
    StrictStore,
    delete_keys,
    key_sizes,
    list_keys,
    open_zarr_store,
    put_files,
)
from storage.errors import (
    CorruptStoreError,
    IncompleteStoreError,
    StaleStoreError,
    StoreError,
    StoreExistsError,
    StoreNotFoundError,
    StoreSpecError,
    StoreWriteError,
)
from storage.inputs import hidden_to_numpy, ints_to_numpy
from storage.int8 import decode
from storage.layout import (
    FORMAT,
    FORMAT_VERSION,
    MARKERS,
    RESERVED_ATTRS,
    ROW_ARRAYS,
    initialize,
    now,
    read_root_metadata,
)
from storage.lock import (
    LOCK_KEY,
    acquire_lock,
    locked_error,
    read_lock,
    release_lock,
)
from storage.reader import ChunkRanges, FastReadError
from storage.remote import check_reachable
from storage.shards import encode_shard, fast_path_applies, marker_chunk
from storage.spec import StoreSpec

# Budget for keeping a finished store's small arrays in RAM (~650 bytes per row at T=128):
# stores up to ~100k rows; beyond that, random blocks would rarely hit a partial cache.
SMALL_ARRAYS_IN_RAM = 64 * 2**20
# A set marker chunk as Zarr encodes it (uint8 1, then its crc32c: the marker array's
# [bytes, crc32c] chain), written directly; tests/test_store_roundtrip.py compares it.
_MARKER_SET = default_buffer_prototype().buffer.from_bytes(marker_chunk(1))
SPEC_FIELDS_CHECKED = ("num_rows", "seq_len", "hidden_size", "dtype")
REBUILD_HINT = (
    "rebuild it: rerun the stage's cache build, or ActivationStore.create(..., overwrite=True)"
)
RESUME_HINT = "rerun the same cache build (ActivationStore.create with the same spec and fingerprint) to resume"


def _arrays_present(store: Store) -> list[str]:
    try:
        return sorted(set(sync(_list_dir(store))) & {*ROW_ARRAYS, MARKERS})
    except (FileNotFoundError, OSError):
        return []


def _normalize_fingerprint(fingerprint: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in fingerprint.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, str | int):
            raise StoreSpecError(
                f"fingerprint must map str to str (or int); got {key!r}: {value!r}"
            )
        out[key] = str(value)
    return out


def _dict_diff(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    return [
        f"{k}: expected {expected.get(k, '<absent>')!r}, found {found.get(k, '<absent>')!r}"
        for k in sorted(set(expected) | set(found))
        if expected.get(k) != found.get(k)
    ]


@contextmanager
def _file_size_limit_as_oserror() -> Iterator[None]:
    """Exceeding RLIMIT_FSIZE sends SIGXFSZ, whose default action kills the process
    outright; ignored, the write fails with EFBIG instead, which we can report."""
    if (
        not hasattr(signal, "SIGXFSZ")
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGXFSZ) is not signal.SIG_DFL
    ):
        yield
        return
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)


def _resumable(
    store: Store, where: str, spec: StoreSpec, fp: dict[str, Any], overwrite: bool
) -> bool:
    """True if `store` holds an identical incomplete build to resume (its partial files
    removed here); False if a new store is to be laid out; StoreExistsError if something
    else is there and `overwrite` is off."""
    try:
        meta = read_root_metadata(store)
    except CorruptStoreError:
        if not overwrite:
            raise
        meta = None  # wiped by the caller
    found = None if meta is None else meta.get("attributes", {})
    if found is not None and found.get("format") == FORMAT:
        problems = _dict_diff(spec.to_dict(), found["spec"]) + _dict_diff(
            {f"fingerprint.{k}": v for k, v in fp.items()},
            {f"fingerprint.{k}": v for k, v in found["fingerprint"].items()},
        )
        if not problems and not found["complete"] and not overwrite:
            _remove_partial_files(store)
            return True
        if not overwrite:
            state = "a complete" if found["complete"] else "an incomplete"
            why = "; ".join(problems) if problems else "it is already complete"
            raise StoreExistsError(
                f"{where} already holds {state} activation store that this build "
                f"cannot resume ({why}). Open it with ActivationStore.open if it is "
                f"what you want, or pass overwrite=True to wipe and rebuild it"
            )
    elif found is not None and not overwrite:
        raise StoreExistsError(
            f"{where} holds a Zarr hierarchy that is not an activation store; choose "
            f"another location, or pass overwrite=True to delete it"
        )
    return False


class ActivationStore:
    """Handle on one store. Build with `create` / `open(mode="r+")`, read with `open`."""

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        writable: bool,
        storage_options: dict[str, Any] | None = None,
    ):
        """Attach to an existing store; use `create` or `open`, which check it.

        `storage_options` go to the fsspec filesystem of a URL (endpoint, credentials...);
        they are kept in memory only, never written to the store."""
        self.url = os.fspath(url)
        self.writable = writable
        self.storage_options = dict(storage_options or {})
        self._pid = os.getpid()
        # Look read-only first: a writable LocalStore creates its directory on first use.
        reader = open_zarr_store(self.url, read_only=True, storage_options=self.storage_options)
        self._meta_attrs: dict[str, Any] = self._root_attrs(reader)
        self.spec = StoreSpec.from_dict(self._meta_attrs["spec"])
        self._store = (
            open_zarr_store(self.url, read_only=False, storage_options=self.storage_options)
            if writable
            else reader
        )
        # Reads go through StrictStore so a missing or empty shard raises instead of
        # reading back as the fill value. A committed store never changes (a rebuild
        # starts from overwrite), so its shard indexes may be kept: one request per chunk
        # read instead of two on object stores.
        strict = StrictStore(reader)
        if self._meta_attrs.get("complete") and not writable:
            strict = StrictStore(ShardIndexCache(reader))
        self._readers = {n: self._open_array(strict, n, "r") for n in ROW_ARRAYS}
        # A finished uncompressed store's blocks are read in one request each (reader.py).
        finished = self._meta_attrs.get("complete") and not writable
        self._direct = None
        if finished and fast_path_applies(self._readers["hidden"]):
            self._direct = ChunkRanges(reader, "hidden", self._readers["hidden"])
        # Marker reads use the plain store: an absent marker chunk legitimately means 0.
        self._kept: dict[str, np.ndarray] | None = None  # see _small_arrays
        self._markers = self._open_array(self._store, MARKERS, "r+" if writable else "r")
        self._writers = {}
        self._fast_arrays: set[str] = set()
        if writable:
            # write_empty_chunks is per handle and not saved (docs/library-facts.md): without it a shard
            # that equals the fill value is never written and later looks missing.
            self._writers = {
                n: zarr.open_array(self._store, path=n, mode="r+").with_config(
                    {"write_empty_chunks": True}
                )
                for n in ROW_ARRAYS
            }
            self._fast_arrays = {n for n, a in self._writers.items() if fast_path_applies(a)}

    def _root_attrs(self, reader: Store) -> dict[str, Any]:
        """The root attributes of the activation store at `self.url`, or why there is none."""
        meta = read_root_metadata(reader)
        if meta is None and (found := _arrays_present(reader)):
            raise CorruptStoreError(
                f"{self.url}/zarr.json (the store's root metadata) is missing, but the store "
                f"holds {found}: it is corrupt, not absent. Rebuild it"
            )
        if meta is None or meta.get("attributes", {}).get("format") != FORMAT:
            what = "nothing" if meta is None else "a Zarr group that is not an activation store"
            raise StoreNotFoundError(
                f"no activation store at {self.url} (found {what}); build one with "
                f"ActivationStore.create or the stage's cache build"
            )
        attrs = meta["attributes"]
        if attrs["format_version"] > FORMAT_VERSION:
            raise StoreError(
                f"{self.url} has format_version {attrs['format_version']}, this "
                f"package reads up to {FORMAT_VERSION}: upgrade cached-mslt or rebuild the store"
            )
        return attrs

    def _open_array(self, store: Store, name: str, mode: str) -> zarr.Array:
        """An array of this store; its metadata missing or unparsable is corruption."""
        try:
            return zarr.open_array(store, path=name, mode=mode)
        except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
            # zarr raises ArrayNotFoundError (a FileNotFoundError) or JSONDecodeError
            raise CorruptStoreError(
                f"{self.url}/{name}/zarr.json (the {name!r} array's metadata) is missing or "
                f"corrupt ({type(e).__name__}: {e}); expected the array the root metadata lists. "
                f"Rebuild the store"
            ) from e

    # ---------------------------------------------------------------- construction

    @classmethod
    def create(
        cls,
        url: str | os.PathLike[str],
        spec: StoreSpec,
        *,
        fingerprint: dict[str, Any],
        attrs: dict[str, Any] | None = None,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> ActivationStore:
        """Create a store (one process, rank 0), or reopen an identical incomplete one to
        resume it. Takes the build lock; `commit` releases it."""
        fp = _normalize_fingerprint(fingerprint)
        extra = dict(attrs or {})
        if clash := RESERVED_ATTRS & set(extra):
            raise StoreSpecError(f"attrs may not set reserved keys {sorted(clash)}")
        try:
            json.dumps(extra, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise StoreSpecError(f"attrs must be JSON-serializable: {e}") from e

        where = os.fspath(url)
        check_reachable(where, storage_options)
        store = open_zarr_store(where, read_only=False, storage_options=storage_options)
        top = sorted(set(sync(_list_dir(store))) - {LOCK_KEY})
        if top and "zarr.json" not in top and not overwrite:
            if (holder := read_lock(store)) is not None and not holder.is_stale():
                # A build that started an instant earlier is laying the store out.
                raise locked_error(where, holder)
            raise StoreExistsError(
                f"{where} is not empty and holds no activation store (found {top[:5]}); "
                f"choose another location, or pass overwrite=True to delete its contents"
            )
        acquire_lock(store, where)
        try:
            if not _resumable(store, where, spec, fp, overwrite):
                if overwrite:
                    delete_keys(store, [k for k in list_keys(store) if k != LOCK_KEY])
                initialize(store, spec, fp, extra)
        except BaseException:
            release_lock(store)
            raise
        return cls(where, writable=True, storage_options=storage_options)

    @classmethod
    def open(
        cls,
        url: str | os.PathLike[str],
        *,
        mode: str = "r",
        expected_fingerprint: dict[str, Any] | None = None,
        expected_spec: StoreSpec | None = None,
        require_complete: bool | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> ActivationStore:
        """Open for reading ("r") or, in a build's worker processes, for writing ("r+").

        `require_complete` defaults to True for "r" and False for "r+". A fingerprint (or
        num_rows/seq_len/hidden_size/dtype) other than expected raises StaleStoreError; an
        incomplete store IncompleteStoreError; a complete store missing shard files
        CorruptStoreError. "r+" does not take the build lock (rank 0's `create` holds it).
        """
        if mode not in ("r", "r+"):
            raise StoreSpecError(f"mode must be 'r' or 'r+', got {mode!r}")
        if require_complete is None:
            require_complete = mode == "r"
        self = cls(url, writable=mode == "r+", storage_options=storage_options)
        problems = []
        if expected_fingerprint is not None:
            problems += _dict_diff(_normalize_fingerprint(expected_fingerprint), self.fingerprint)
        if expected_spec is not None:
            want, have = expected_spec.to_dict(), self.spec.to_dict()
            problems += _dict_diff(
                {k: want[k] for k in SPEC_FIELDS_CHECKED}, {k: have[k] for k in SPEC_FIELDS_CHECKED}
            )
        if problems:
            raise StaleStoreError(
                f"{self.url} was built from other inputs than this run expects: "
                f"{'; '.join(problems)}. The cache is stale: {REBUILD_HINT}"
            )
        complete = self.is_complete
        if require_complete and not complete:
            done = len(self.shards_done())
            raise IncompleteStoreError(
                f"{self.url} is incomplete: {done}/{self.num_shards} shards written and the "
                f"build never committed. To finish it, {RESUME_HINT}; or {REBUILD_HINT}"
            )
        if complete and (missing := self._missing_files()):
            raise CorruptStoreError(
                f"{self.url} is marked complete but shard files are missing or empty: "
                f"{_summarize(missing)}. The store lost data: {REBUILD_HINT}"
            )
        return self

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a fresh read-only handle (options travel in memory only).
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], writable=False, storage_options=state["storage_options"])  # type: ignore[misc]

    # ---------------------------------------------------------------- layout

    @property
    def num_shards(self) -> int:
        return self.spec.num_shards

    @property
    def rows_per_chunk(self) -> int:
        return self.spec.rows_per_chunk  # type: ignore[return-value]

    @property
    def rows_per_shard(self) -> int:
        return self.spec.rows_per_shard

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes, read fresh from the store."""
        meta = read_root_metadata(self._store)
        if meta is None:
            raise CorruptStoreError(f"{self.url}: the root zarr.json disappeared")
        return meta["attributes"]

    @property
    def fingerprint(self) -> dict[str, str]:
        return dict(self._meta_attrs["fingerprint"])

    @property
    def is_complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """Rows [start, stop) of a shard."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range: {self.url} has {self.num_shards} shards")
        start = shard * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.spec.num_rows)

    def shards_for(self, rank: int, world_size: int) -> list[int]:
        """Shards owned by `rank`: s % world_size == rank."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        return list(range(rank, self.num_shards, world_size))

    def shards_done(self) -> list[int]:
        """Shards whose marker is set, from one listing of the marker keys: a marker chunk
        exists exactly when it is set (unset markers equal the fill value and are not
        stored), and reading thousands of one-byte chunks one by one would cost a request
        each (a write-through store has one shard per batch block)."""
        keys = set(list_keys(self._store, f"{MARKERS}/"))
        return [s for s in range(self.num_shards) if self._marker_key(s) in keys]

    def is_shard_done(self, shard: int) -> bool:
        """One existence check (the marker chunk exists exactly when it is set): a
        write-through reader asks this for every block it has not seen written."""
        self.shard_rows(shard)  # range check
        return sync(self._store.exists(self._marker_key(shard)))

    def pending_shards(self, rank: int, world_size: int) -> list[int]:
        """Owned shards not marked done yet (what a resumed build still has to write)."""
        done = set(self.shards_done())
        return [s for s in self.shards_for(rank, world_size) if s not in done]

    def shards_of_rows(self, start: int, stop: int) -> range:
        """The shards holding rows [start, stop)."""
        self._check_rows(start, stop)
        return range(start // self.rows_per_shard, -(-stop // self.rows_per_shard))

    def _shard_keys(self, shard: int) -> dict[str, str]:
        """Array name -> store key of that array's file for `shard`."""
        keys = {}
        for name, arr in self._readers.items():
            coords = (shard,) + (0,) * (arr.ndim - 1)
            keys[name] = f"{name}/{arr.metadata.encode_chunk_key(coords)}"
        return keys

    def _missing_files(self) -> dict[str, int]:
        """Shard files that are absent or empty -> their shard, over every array."""
        owner = {key: s for s in range(self.num_shards) for key in self._shard_keys(s).values()}
        sizes = key_sizes(self._store, owner)
        return {key: owner[key] for key, size in sizes.items() if not size}

    # ---------------------------------------------------------------- writing

    def write_shard(
        self,
        shard: int,
        *,
        hidden: torch.Tensor | np.ndarray,
        attention_mask: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray,
        row_index: torch.Tensor | np.ndarray,
    ) -> None:
        """Write one whole shard of every array, then mark it done (last)."""
        if not self.writable:
            raise StoreWriteError(f"{self.url} is open read-only; writers open with mode='r+'")
        if self.is_complete:
            raise StoreWriteError(
                f"{self.url} is complete and read-only by contract; {REBUILD_HINT}"
            )
        start, stop = self.shard_rows(shard)
        rows, t, where = stop - start, self.spec.seq_len, f"{self.url} shard {shard}"
        data = {
            "hidden": hidden_to_numpy(hidden, self.spec, (rows, t, self.spec.hidden_size), where),
            "attention_mask": ints_to_numpy("attention_mask", attention_mask, (rows, t), where),
            "labels": ints_to_numpy("labels", labels, (rows, t), where),
            "row_index": ints_to_numpy("row_index", row_index, (rows,), where),
        }
        try:
            with _file_size_limit_as_oserror():
                # One call per array for the whole shard: Zarr rewrites a shard whole, so
                # partial writes from two processes to one shard lose data (docs/library-facts.md).
                if files := self._encoded_files(shard, start, stop, data):
                    put_files(self._store, files, last=(self._marker_key(shard), _MARKER_SET))
                else:
                    for name, values in data.items():
                        self._write_array(name, shard, start, stop, values)
                    self._markers[shard] = 1  # last: a set marker means every array is written
        except OSError as e:
            raise StoreWriteError(
                f"{self.url}: writing shard {shard} (rows {start}-{stop}) failed: {e}. The "
                f"shard stays not-done; free space (or raise the file-size limit) and {RESUME_HINT}"
            ) from e

    def _encoded_files(
        self, shard: int, start: int, stop: int, data: dict[str, np.ndarray]
    ) -> dict[str, Any] | None:
        """Store key -> encoded file of each array's shard, when every array's codec chain
        allows encoding it here (storage/shards.py: the same bytes as Zarr's, without its
        per-chunk overhead); None if one does not."""
        if any(name not in self._fast_arrays for name in data):
            return None
        keys, files = self._shard_keys(shard), {}
        for name, values in data.items():
            meta = self._writers[name].metadata
            inner_rows = meta.codecs[0].chunk_shape[0]  # type: ignore[attr-defined]
            encoded = encode_shard(
                values,
                rows_per_chunk=inner_rows,
                chunks_per_shard=meta.chunk_grid.chunk_shape[0] // inner_rows,  # type: ignore[attr-defined]
                fill_value=meta.fill_value,
            )
            files[keys[name]] = default_buffer_prototype().buffer.from_array_like(encoded)
        return files

    def _marker_key(self, shard: int) -> str:
        return f"{MARKERS}/{self._markers.metadata.encode_chunk_key((shard,))}"

    def _write_array(
        self, name: str, shard: int, start: int, stop: int, values: np.ndarray
    ) -> None:
        """One array's whole shard through Zarr (a codec chain `encode_shard` cannot build)."""
        self._writers[name][start:stop] = values

    def commit(self) -> None:
        """Check every marker and shard file, then set `complete` and release the lock
        (if this process holds it: the build's rank 0 commits, through any handle)."""
        if not self.writable:
            raise StoreWriteError(f"{self.url} is open read-only; commit from the build's rank 0")
        holder = read_lock(self._store)
        if holder is not None and not holder.is_this_process() and not holder.is_stale():
            raise locked_error(self.url, holder)
        pending = sorted(set(range(self.num_shards)) - set(self.shards_done()))
        if pending:
            raise IncompleteStoreError(
                f"{self.url}: cannot commit, {len(pending)}/{self.num_shards} shards are not "
                f"marked done (first: {pending[:8]}); some process did not finish its shards. "
                f"To finish, {RESUME_HINT}"
            )
        if missing := self._missing_files():
            # Clear their markers, so a resumed build rewrites them instead of skipping them.
            for shard in sorted(set(missing.values())):
                self._markers[shard] = 0
            raise IncompleteStoreError(
                f"{self.url}: cannot commit, shards marked done have missing or empty files: "
                f"{_summarize(missing)}. Their markers were cleared; {RESUME_HINT}"
            )
        group = zarr.open_group(self._store, mode="r+")
        group.attrs.update({"complete": True, "completed_at": now()})
        self.release_lock()

    def release_lock(self) -> None:
        """Give up this process's build lock (commit does it; call it to abandon a build)."""
        release_lock(self._store)

    # ---------------------------------------------------------------- reading

    def read_rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows [start, stop) as tensors: hidden in the logical dtype, the rest int64."""
        self._check_rows(start, stop)
        self._reopen_if_forked()
        return self._read_arrays(ROW_ARRAYS, start, stop)

    def read_hidden(self, start: int, stop: int) -> torch.Tensor:
        """`read_rows(start, stop)["hidden"]` without reading the other three arrays: an
        incremental cache build needs only this, and through Zarr's per-chunk decoding the
        small arrays cost twice hidden's CPU (tiny, 8-row chunks: 0.68 s against 0.21 s
        for a 4,096-row store), taken from the forward it overlaps."""
        self._check_rows(start, stop)
        self._reopen_if_forked()
        return self._as_tensor("hidden", self._read("hidden", start, stop))

    def read_blocks(
        self, ranges: list[tuple[int, int]], arrays: tuple[str, ...] = ROW_ARRAYS
    ) -> list[dict[str, torch.Tensor]]:
        """`read_rows` of several row ranges (only `arrays` of them), every chunk of every
        range requested at once.

        On an object store each request costs a round trip and server time; issued one
        after another they starve training (docs/cache-format.md, measured), so they all
        go out together, and the small arrays (mask, labels, row_index: ~5 bytes per
        token) of a store up to SMALL_ARRAYS_IN_RAM bytes are read whole once and kept,
        leaving one `hidden` chunk request per block. Any failure is re-read range by
        range, which names the missing or corrupt chunk exactly as `read_rows` does.
        """
        for start, stop in ranges:
            self._check_rows(start, stop)
        self._reopen_if_forked()
        kept = {n: v for n, v in self._small_arrays().items() if n in arrays}
        direct = self._read_direct(ranges) if "hidden" in arrays else None
        fetched = [n for n in arrays if n not in kept and not (n == "hidden" and direct)]

        async def gather() -> list[np.ndarray]:
            return await asyncio.gather(
                *(
                    self._readers[name].async_array.getitem(slice(start, stop))
                    for start, stop in ranges
                    for name in fetched
                )
            )

        try:
            values = iter(sync(gather()))
        except (MissingChunkError, ValueError):
            return [self._read_arrays(arrays, start, stop) for start, stop in ranges]
        blocks = []
        for i, (start, stop) in enumerate(ranges):
            raw = {n: next(values) for n in fetched} | {n: kept[n][start:stop] for n in kept}
            if direct:
                raw["hidden"] = direct[i]
            blocks.append(self._as_tensors({n: raw[n] for n in arrays}))
        return blocks

    def _read_direct(self, ranges: list[tuple[int, int]]) -> list[np.ndarray] | None:
        """`hidden` of every range in one request per block, or None where that path does
        not apply (any doubt: Zarr reads it and names what is wrong)."""
        if self._direct is None:
            return None
        try:
            return sync(self._direct.read(ranges))
        except (FastReadError, FileNotFoundError, OSError):
            return None

    def _read_arrays(self, arrays: tuple[str, ...], start: int, stop: int) -> dict:
        """`arrays` of rows [start, stop), one after another: names a bad chunk exactly."""
        return self._as_tensors({name: self._read(name, start, stop) for name in arrays})

    def _small_arrays(self) -> dict[str, np.ndarray]:
        """mask, labels and row_index whole, if the store is complete and they fit."""
        if self._kept is None:
            self._kept = {}
            small = [n for n in ROW_ARRAYS if n != "hidden"]
            nbytes = sum(self._readers[n].nbytes for n in small)
            if self._meta_attrs.get("complete") and nbytes <= SMALL_ARRAYS_IN_RAM:
                try:
                    self._kept = {n: self._read(n, 0, self.spec.num_rows) for n in small}
                except StoreError:
                    self._kept = {}  # damaged: per-block reads will name the chunk
        return self._kept

    def _reopen_if_forked(self) -> None:
        """A forked DataLoader worker inherits this handle without pickling it; an fsspec
        filesystem's HTTP session is bound to the parent's event loop and fails there."""
        if self._pid != os.getpid() and not isinstance(self._store, LocalStore):
            self.__init__(self.url, writable=False, storage_options=self.storage_options)  # type: ignore[misc]

    def _check_rows(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.spec.num_rows:
            raise IndexError(
                f"rows [{start}, {stop}) outside [0, {self.spec.num_rows}) of {self.url}"
            )

    def _as_tensors(self, raw: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: self._as_tensor(k, v) for k, v in raw.items()}

    def _as_tensor(self, name: str, values: np.ndarray) -> torch.Tensor:
        """hidden in the logical dtype (bfloat16 is stored as its uint16 bits; int8 decoded
        to bfloat16, storage/int8.py), the rest int64."""
        if name != "hidden":
            return torch.from_numpy(values).long()
        if self.spec.dtype == "int8":
            return decode(values)
        hidden = torch.from_numpy(values)
        return hidden.view(torch.bfloat16) if self.spec.dtype == "bfloat16" else hidden

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        try:
            return self._readers[name][start:stop]
        except MissingChunkError as e:
            shard = self._shard_of_key(name, e.key)
            a, b = self.shard_rows(shard)
            if not self._markers[shard]:
                raise IncompleteStoreError(
                    f"{self.url}: rows {a}-{b} (shard {shard}) were never written; {RESUME_HINT}"
                ) from e
            raise CorruptStoreError(
                f"{self.url}: array {name!r} shard file {e.key} (rows {a}-{b}) is missing or "
                f"empty although shard {shard} is marked done: the store lost data; {REBUILD_HINT}"
            ) from e
        except ValueError as e:
            if "checksum" not in str(e):
                raise
            raise self._locate_corruption(name, start, stop) from e

    def _shard_of_key(self, name: str, key: str) -> int:
        return int(key.removeprefix(f"{name}/").split("/")[1])

    def _locate_corruption(self, name: str, start: int, stop: int) -> CorruptStoreError:
        """Re-read chunk by chunk to name the chunk whose checksum fails (Zarr does not)."""
        arr, rpc = self._readers[name], self.rows_per_chunk
        for chunk in range(start // rpc, math.ceil(stop / rpc)):
            a, b = chunk * rpc, min((chunk + 1) * rpc, self.spec.num_rows)
            try:
                arr[a:b]
            except ValueError:
                coords = (chunk,) + (0,) * (arr.ndim - 1)
                key = self._shard_keys(a // self.rows_per_shard)[name]
                return CorruptStoreError(
                    f"{self.url}: array {name!r} chunk {coords} (rows {a}-{b}, in shard file "
                    f"{key}) fails its crc32c checksum: its bytes changed after writing. "
                    f"Do not train on it; {REBUILD_HINT}"
                )
        return CorruptStoreError(
            f"{self.url}: array {name!r} rows {start}-{stop} failed a checksum; {REBUILD_HINT}"
        )

    def __repr__(self) -> str:
        return f"ActivationStore({self.url!r}, {self.spec}, writable={self.writable})"


def _summarize(missing: dict[str, int], limit: int = 5) -> str:
    keys = sorted(missing)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


async def _list_dir(store: Store) -> list[str]:
    return [k async for k in store.list_dir("")]


def _remove_partial_files(store: Store) -> None:
    """Delete temporary files a killed writer left behind (Zarr's LocalStore writes
    `<key>.<uuid>.partial` then renames), so a resumed build ends byte-identical."""
    delete_keys(store, [k for k in list_keys(store) if k.endswith(PARTIAL_SUFFIX)])
