"""The on-disk layout: array names, attributes, and creating them (docs/cache-format.md)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import zarr
from zarr.abc.store import Store
from zarr.codecs import Crc32cCodec

from storage.backend import get_bytes
from storage.errors import CorruptStoreError
from storage.spec import StoreSpec

FORMAT = "cached-mslt-activations"
# 2: write-through stores (incomplete by design, one chunk per shard; docs/cache-format.md)
FORMAT_VERSION = 2
ROW_ARRAYS = ("hidden", "attention_mask", "labels", "row_index")
MARKERS = "shard_done"
# Fill values double as "never written" sentinels that real data cannot take, so a plain
# Zarr reader can tell a hole from data (Zarr reads missing chunks as the fill value).
INT_FILLS: dict[str, int] = {
    "attention_mask": 255,  # real values are 0 and 1
    "labels": -(2**31),  # real values are -100 or token ids
    "row_index": -1,  # real values are >= 0
}
RESERVED_ATTRS = frozenset(
    {
        "format",
        "format_version",
        "spec",
        "logical_dtype",
        "storage_dtype",
        "num_shards",
        "rows_per_shard",
        "fingerprint",
        "package_version",
        "created_at",
        "completed_at",
        "complete",
    }
)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _package_version() -> str:
    try:
        return metadata.version("cached-mslt")
    except metadata.PackageNotFoundError:
        return "unknown"


def read_root_metadata(store: Store) -> dict[str, Any] | None:
    """The root `zarr.json`, parsed fresh: Zarr handles keep stale attrs (docs/library-facts.md)."""
    raw = get_bytes(store, "zarr.json")
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:  # truncated, emptied, overwritten
        raise CorruptStoreError(
            f"{store}/zarr.json (the store's root metadata) is corrupt: expected JSON, found "
            f"{len(raw)} bytes that do not parse ({e}). The store cannot be trusted: "
            f"rebuild it"
        ) from e
    if not isinstance(meta, dict):
        raise CorruptStoreError(f"{store}/zarr.json is corrupt: expected a JSON object; rebuild it")
    return meta


def initialize(
    store: Store, spec: StoreSpec, fingerprint: dict[str, str], extra: dict[str, Any]
) -> None:
    """Create the group (complete=False) and its five empty arrays."""
    attrs = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "logical_dtype": spec.dtype,
        "storage_dtype": spec.storage_dtype,
        "num_shards": spec.num_shards,
        "rows_per_shard": spec.rows_per_shard,
        "fingerprint": fingerprint,
        "package_version": _package_version(),
        "created_at": now(),
        "completed_at": None,
        "complete": False,
        **extra,
    }
    zarr.create_group(store, attributes=attrs)
    n, t, w = spec.num_rows, spec.seq_len, spec.stored_width
    layouts = {
        "hidden": ((n, t, w), spec.storage_dtype, spec.hidden_fill, ("row", "token", "hidden")),
        "attention_mask": ((n, t), "uint8", INT_FILLS["attention_mask"], ("row", "token")),
        "labels": ((n, t), "int32", INT_FILLS["labels"], ("row", "token")),
        "row_index": ((n,), "int64", INT_FILLS["row_index"], ("row",)),
    }
    for name, (shape, dtype, fill, dims) in layouts.items():
        # Same rows per chunk and per shard in every row array: shard s of each array
        # covers the same rows, so one process owns all of them.
        zarr.create_array(
            store,
            name=name,
            shape=shape,
            dtype=dtype,
            chunks=(spec.rows_per_chunk, *shape[1:]),
            shards=(spec.rows_per_shard, *shape[1:]),
            compressors=spec.compressors(),
            fill_value=fill,
            dimension_names=dims,
        )
    # One chunk per marker: markers written by different processes never share a file.
    zarr.create_array(
        store,
        name=MARKERS,
        shape=(spec.num_shards,),
        dtype="uint8",
        chunks=(1,),
        compressors=[Crc32cCodec()],
        fill_value=0,
        dimension_names=("shard",),
    )
