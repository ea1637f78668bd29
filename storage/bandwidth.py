"""How fast a store location takes and gives bytes, measured with the requests a stage
makes: one write per unit, as a write-through writer does, and one batch of concurrent
reads, as the loader does (docs/scaling.md, "Planning a run").

A stage prices its cache modes with these rates (`--cache auto`): a slow object store can
make an eager build or write-through dearer than running the frozen bottom live. The probe
writes `units` objects of `unit_bytes` random bytes under a directory of its own (the run
puts it beside its stores), reads them back and deletes them; a probe left by a killed
process is overwritten by the next and never read as a store.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from storage.backend import delete_keys, is_local, open_zarr_store, put_files


@dataclass(frozen=True)
class Bandwidth:
    """Bytes per second of one process's writes (one unit at a time) and reads (a batch
    at once), over `nbytes` each way."""

    read_bytes_per_s: float
    write_bytes_per_s: float
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_bandwidth(
    url: str,
    unit_bytes: int,
    units: int = 16,
    name: str = "rank-0",
    storage_options: dict[str, Any] | None = None,
) -> Bandwidth:
    """Write `units` objects of `unit_bytes` under `<url>/<name>/` one by one, read them
    all back at once, delete them; the rates each way."""
    store = open_zarr_store(url, read_only=False, storage_options=storage_options)
    payload = np.random.default_rng().bytes(unit_bytes)  # incompressible, never cached before
    value = default_buffer_prototype().buffer.from_bytes(payload)
    keys = [f"{name}/unit-{i}" for i in range(units)]
    try:
        began = time.perf_counter()
        for key in keys:
            put_files(store, {}, (key, value))
        wrote = time.perf_counter() - began

        async def read_all() -> list:
            return await asyncio.gather(*(store.get(k, default_buffer_prototype()) for k in keys))

        read = float("inf")
        for _ in range(2):  # the best of two: the first also starts Zarr's I/O loop
            began = time.perf_counter()
            back = sync(read_all())
            read = min(read, time.perf_counter() - began)
    finally:
        _remove(store, name, keys)
    if any(b is None or len(b) != unit_bytes for b in back):
        raise OSError(f"{url}: the probe read back fewer bytes than it wrote")
    nbytes = units * unit_bytes
    return Bandwidth(nbytes / max(read, 1e-9), nbytes / max(wrote, 1e-9), nbytes)


def _remove(store, name: str, keys: list[str]) -> None:
    """The probe's objects, and on a local disk its directories (the last process out
    removes `<url>` itself)."""
    if not is_local(store):
        delete_keys(store, keys)
        return
    shutil.rmtree(store.root / name, ignore_errors=True)
    with contextlib.suppress(OSError):  # another process's probe is still there
        store.root.rmdir()
