"""The block loader measured in bytes at bert-base's row (T=128, H=768, float16: 196,608
bytes of hidden states a row), against what a GPU would consume (docs/benchmarks.md,
"The loader in bytes").

- `memory_copy`: a plain numpy copy of a buffer larger than the caches: the ceiling a
  loader that copies each byte once can reach on this machine;
- `loader` from local disk with the store's files in the page cache, and cold (their pages
  dropped with `posix_fadvise(DONTNEED)` before each epoch: only this store's files, so
  other processes' cache is left alone; /proc/sys/vm/drop_caches is not writable here);
- `loader` from an S3 API on loopback (moto, served by its own process, as an object
  store is served by other machines);

each with 0, 2 and 4 DataLoader workers, in rows/s and GB/s of hidden states delivered
(the batch's mask, labels and row index ride along and are not counted). Beside them, what
the planner's cost model says one GPU's cached bert-base step consumes.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from storage import ActivationStore, BlockDataset, StoreSpec, make_block_loader, synthetic_rows

SEQ_LEN, HIDDEN = 128, 768  # bert-base
ROW_BYTES = SEQ_LEN * HIDDEN * 2  # float16 hidden states per row
WORKERS = (0, 2, 4)
BATCH_ROWS = 32  # bert-base's per-GPU batch (config.PRESETS)


def memory_copy_gbps(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """GB/s of `np.copyto` between two buffers of `nbytes` (best of `repeats`)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - began)
    return nbytes / best / 1e9


def drop_from_page_cache(root: Path) -> None:
    """Evict this store's files (and only them) from the page cache."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def epoch_rate(loader, epoch: int) -> tuple[float, float]:
    """(rows/s, GB/s of hidden states) of one epoch of `loader`."""
    loader.set_epoch(epoch)
    began = time.perf_counter()
    rows = sum(len(batch["hidden"]) for batch in loader)
    seconds = time.perf_counter() - began
    return rows / seconds, rows * ROW_BYTES / seconds / 1e9


def build_store(url: str, rows: int, storage_options: dict | None = None) -> ActivationStore:
    """A complete bert-base-shaped float16 store of `rows` rows, 8 rows a chunk (the
    trainer's block for batches divisible by 8)."""
    spec = StoreSpec(num_rows=rows, seq_len=SEQ_LEN, hidden_size=HIDDEN, rows_per_chunk=8)
    store = ActivationStore.create(
        url, spec, fingerprint={"bench": "loader"}, storage_options=storage_options
    )
    for shard in range(store.num_shards):
        a, b = store.shard_rows(shard)
        store.write_shard(shard, **synthetic_rows(spec, a, b))
    store.commit()
    return ActivationStore.open(url, storage_options=storage_options)


def loader_figures(
    store: ActivationStore,
    backend: str,
    epochs: int,
    cold_root: Path | None = None,
    block_rows: int = 8,
) -> list[dict[str, Any]]:
    """rows/s and GB/s per worker count: the best of `epochs` epochs after one warm-up
    epoch (which also starts the workers); cold: the page cache dropped before each.
    `block_rows` rows are one request (8: the trainer's block)."""
    figures = []
    for workers in WORKERS:
        loader = make_block_loader(
            BlockDataset(store, block_rows=block_rows),
            rows_per_batch=BATCH_ROWS,
            shuffle=True,
            seed=0,
            num_workers=workers,
        )
        epoch_rate(loader, 0)
        rates = []
        for epoch in range(1, epochs + 1):
            if cold_root is not None:
                drop_from_page_cache(cold_root)
            rates.append(epoch_rate(loader, epoch))
        rows_s, gbps = max(rates)
        tag = {"backend": backend, "num_workers": workers, "rows": store.spec.num_rows}
        tag["block_rows"] = block_rows
        figures += [
            {"name": "loader_rows_per_s", "value": round(rows_s, 1), "unit": "rows/s", **tag},
            {"name": "loader_gbps", "value": round(gbps, 3), "unit": "GB/s", **tag},
        ]
        del loader  # persistent workers end with their loader
    return figures


def gpu_consumption_gbps(gpu: str = "A100", mfu: float = 0.3) -> dict[str, Any]:
    """What the cost model says one GPU's cached bert-base step (3 trained layers and the
    head, frozen decoder weight) reads per second at `mfu` of the peak table's bf16 figure."""
    from cached_mslt.config import PlanArgs, run_args
    from cached_mslt.stages import model_shape, plan_rates

    shape = model_shape(run_args("bert-base"))
    rate = plan_rates(PlanArgs(gpu=gpu, mfu=mfu)).train_flops_per_s
    rows_s = rate / shape.train_row_flops(3, False)
    return {
        "name": "planned_gpu_consumption_gbps",
        "value": round(rows_s * ROW_BYTES / 1e9, 3),
        "unit": "GB/s",
        "rows_per_s": round(rows_s, 1),
        "gpu": gpu,
        "mfu": mfu,
    }


def loader_benchmarks(quick: bool, s3: bool = True, root: str | None = None) -> list[dict]:
    """Every figure of the loader in bytes: the copy ceiling, local (page cache, cold),
    S3 on loopback, each with 0/2/4 workers, and the planned GPU consumption."""
    rows, epochs = (512, 2) if quick else (2048, 3)
    figures = [
        {"name": "memory_copy_gbps", "value": round(memory_copy_gbps(), 3), "unit": "GB/s"},
        gpu_consumption_gbps(),
    ]
    with tempfile.TemporaryDirectory(prefix="bench-loader-", dir=root) as tmp:
        store = build_store(f"{tmp}/store", rows)
        figures += loader_figures(store, "page-cache", epochs)
        figures += loader_figures(store, "cold", epochs, cold_root=Path(tmp) / "store")
    if s3:
        from storage import loopback_s3_process

        with loopback_s3_process("bench") as options:
            store = build_store("s3://bench/loader", rows // 2, options)
            figures += loader_figures(store, "s3-loopback", epochs)
            # a whole batch per request: a quarter of the requests, the shuffle coarser
            figures += loader_figures(store, "s3-loopback", epochs, block_rows=BATCH_ROWS)
    return figures
