"""Storage throughput figures for `pipelines/bench.py` (measures, never asserts).

Per shape, dtype and codec: write MB/s, sequential read MB/s, compression ratio, and
rows/s of the block loader fed from the store and from the same rows in RAM. MB/s
counts logical bytes (all four arrays, uncompressed), MB = 1e6 bytes. Reads follow the
write, so they mostly hit the page cache: they measure decode + copy, not the disk.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from storage import (
    CODECS,
    DTYPES,
    ActivationStore,
    BlockDataset,
    StoreSpec,
    make_block_loader,
    synthetic_rows,
)

SHAPES = {"tiny": (128, 128), "bert-base": (128, 768)}  # (seq_len, hidden_size)
TARGET_BATCH_ROWS = 64  # about the tiny preset's batch; rounded to whole blocks
# 0: collate runs in the main process with torch's intra-op threads; on a loaded 2-core
# machine a 2-thread copy was measured ~100x slower than a 1-thread one. DataLoader
# workers run torch single-threaded.
LOADER_WORKERS = (0, 2)


def _logical_bytes(rows: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in rows.values())


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _loader_rows_per_s(dataset: BlockDataset, num_workers: int, epochs: int = 3) -> float:
    """Best epoch of a few (a shared machine is noisy; the first epoch also starts workers)."""
    rows_per_batch = dataset.block_rows * max(1, TARGET_BATCH_ROWS // dataset.block_rows)
    loader = make_block_loader(
        dataset, rows_per_batch=rows_per_batch, shuffle=True, seed=0, num_workers=num_workers
    )
    best = 0.0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        began = time.perf_counter()
        rows = sum(len(batch["row_index"]) for batch in loader)
        best = max(best, rows / (time.perf_counter() - began))
    return best


def measure_store(
    spec: StoreSpec,
    rows: dict[str, torch.Tensor],
    root: Path | str,
    storage_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Build one store from `rows` under `root` (a directory or a URL); time write, read
    and loaders."""
    name = f"{spec.num_rows}x{spec.seq_len}x{spec.hidden_size}-{spec.dtype}-{spec.codec}"
    url = root / name if isinstance(root, Path) else f"{root.rstrip('/')}/{name}"
    mb = _logical_bytes(rows) / 1e6
    began = time.perf_counter()
    store = ActivationStore.create(
        url, spec, fingerprint={"bench": "synthetic"}, storage_options=storage_options
    )
    for shard in range(store.num_shards):
        start, stop = store.shard_rows(shard)
        store.write_shard(shard, **{k: v[start:stop] for k, v in rows.items()})
    store.commit()
    write_s = time.perf_counter() - began

    reader = ActivationStore.open(url, storage_options=storage_options)
    began = time.perf_counter()
    for start in range(0, spec.num_rows, spec.rows_per_shard):
        reader.read_rows(start, min(start + spec.rows_per_shard, spec.num_rows))
    read_s = time.perf_counter() - began

    figures = [
        {"name": "store_write", "value": mb / write_s, "unit": "MB/s"},
        {"name": "store_read_sequential", "value": mb / read_s, "unit": "MB/s"},
    ]
    if isinstance(url, Path):
        ratio = _logical_bytes(rows) / _disk_bytes(url)
        figures.append(
            {"name": "store_compression_ratio", "value": ratio, "unit": "logical/disk bytes"}
        )
    in_ram = BlockDataset(reader, in_memory=True)
    for workers in LOADER_WORKERS:
        from_store = _loader_rows_per_s(BlockDataset(reader), workers)
        from_ram = _loader_rows_per_s(in_ram, workers)
        tag = {"num_workers": workers}
        figures += [
            {"name": "store_loader_rows", "value": from_store, "unit": "rows/s", **tag},
            {"name": "ram_loader_rows", "value": from_ram, "unit": "rows/s", **tag},
            {"name": "store_vs_ram_loader", "value": from_store / from_ram, "unit": "ratio", **tag},
        ]
    tags = {"seq_len": spec.seq_len, "hidden_size": spec.hidden_size, "rows": spec.num_rows}
    tags |= {"dtype": spec.dtype, "codec": spec.codec, "rows_per_chunk": spec.rows_per_chunk}
    return [{**f, "value": round(f["value"], 3), **tags} for f in figures]


def storage_benchmarks(
    quick: bool, root: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """JSON-able figures; `quick` covers float16 (the default cache dtype) with every codec
    on the tiny shape and uncompressed on the bert-base shape (under a minute on 2 idle
    cores); the full run every dtype and codec on both shapes."""
    rows_for = {"tiny": 2048, "bert-base": 320} if quick else {"tiny": 8192, "bert-base": 1280}
    if quick:  # the default cache dtype with every codec: the rows docs/benchmarks.md shows
        runs = [("tiny", "float16", c) for c in CODECS] + [("bert-base", "float16", "none")]
    else:
        runs = [(s, d, c) for s in SHAPES for d, c in itertools.product(DTYPES, CODECS)]
    figures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-storage-", dir=root) as tmp:
        data: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for shape, dtype, codec in runs:
            t, h = SHAPES[shape]
            spec = StoreSpec(
                num_rows=rows_for[shape], seq_len=t, hidden_size=h, dtype=dtype, codec=codec
            )
            if (shape, dtype) not in data:
                data = {
                    (shape, dtype): synthetic_rows(spec, 0, spec.num_rows)
                }  # keep one set in RAM
            figures += [
                {**f, "shape": shape} for f in measure_store(spec, data[shape, dtype], Path(tmp))
            ]
    return figures


def s3_storage_benchmarks(quick: bool) -> list[dict[str, Any]]:
    """The write, read and loader figures for float16 stores on an S3 API on loopback,
    tagged `backend: s3-loopback`. The server (moto, dev extra) runs in this process, so
    it competes with the client for CPU and the GIL: a pessimistic figure for a real
    endpoint, which serves requests from other machines."""
    from storage import loopback_s3

    rows_for = {"tiny": 512, "bert-base": 128} if quick else {"tiny": 2048, "bert-base": 512}
    figures: list[dict[str, Any]] = []
    with loopback_s3("bench") as options:
        for shape, num_rows in rows_for.items():
            t, h = SHAPES[shape]
            # 8 rows per chunk: what the trainer uses for batch sizes divisible by 8
            spec = StoreSpec(num_rows=num_rows, seq_len=t, hidden_size=h, rows_per_chunk=8)
            rows = synthetic_rows(spec, 0, spec.num_rows)
            measured = measure_store(spec, rows, f"s3://bench/{shape}", storage_options=options)
            figures += [{**f, "shape": shape, "backend": "s3-loopback"} for f in measured]
    return figures


if __name__ == "__main__":
    import json
    import sys

    figures = storage_benchmarks(quick="--quick" in sys.argv)
    if "--s3" in sys.argv:
        figures += s3_storage_benchmarks(quick="--quick" in sys.argv)
    for figure in figures:
        print(json.dumps(figure))
