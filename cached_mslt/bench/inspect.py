"""Streaming-read figures of the inspect tools, for `pipelines/bench.py` (measures only).

The key figure, `stats_vs_sequential_read`, is the MB/s of `hidden_stats` over a whole
store divided by the MB/s of reading the same store sequentially shard by shard (as
`cached_mslt.bench.store` measures it), both timed in the same run, interleaved, median of
repeats: a shared machine's noise hits both sides. Goal: at least 0.5. MB counts the
logical bytes of all four row arrays (MB = 1e6 bytes), which both sides read.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cached_mslt.bench.interleave import interleaved_rounds
from cached_mslt.inspect import hidden_stats, logical_bytes, similarity, single_threaded_compute
from storage import ActivationStore, StoreSpec, write_synthetic_shards

SHAPES = {"tiny": (128, 128), "bert-base": (128, 768)}  # (seq_len, hidden_size)


def sequential_read(store: ActivationStore) -> None:
    for shard in range(store.num_shards):
        store.read_rows(*store.shard_rows(shard))


def sequential_read_one_thread(store: ActivationStore) -> None:
    """The same read with torch on one thread, as `hidden_stats` runs it: on a loaded
    machine two threads can be slower, which would flatter the main ratio."""
    with single_threaded_compute():
        sequential_read(store)


def measure_inspect(
    spec: StoreSpec, root: Path, repeats: int, with_similarity: bool, cap_s: float = 20.0
) -> list[dict]:
    url = root / f"{spec.num_rows}x{spec.seq_len}x{spec.hidden_size}-{spec.dtype}"
    writer = ActivationStore.create(url, spec, fingerprint={"bench": "inspect"})
    write_synthetic_shards(writer, list(range(writer.num_shards)))
    writer.commit()
    store = ActivationStore.open(url)
    mb = logical_bytes(spec.to_dict()) / 1e6
    fns: dict[str, Callable[[], Any]] = {
        "read": lambda: sequential_read(store),
        "read_1thread": lambda: sequential_read_one_thread(store),
        "stats": lambda: hidden_stats(store),
    }
    if with_similarity:
        fns["similarity"] = lambda: similarity([store, store])
    pairs = [("read", "stats"), ("read_1thread", "stats")]
    rounds = interleaved_rounds(fns, pairs, window=repeats, cap_s=cap_s)
    seconds = {name: rounds.median_s(name) for name in fns}
    tags = {"shape": f"{spec.seq_len}x{spec.hidden_size}", "rows": spec.num_rows}
    tags |= {"dtype": spec.dtype, "codec": spec.codec, "store_mb": round(mb, 1)}
    figures = [
        {"name": "inspect_read_sequential", "value": mb / seconds["read"], "unit": "MB/s"},
        {"name": "inspect_stats", "value": mb / seconds["stats"], "unit": "MB/s"},
        {
            "name": "stats_vs_sequential_read",
            **rounds.ratio("read", "stats"),
            "unit": "ratio",
            "goal": 0.5,
        },
        {
            "name": "stats_vs_sequential_read_1thread",
            **rounds.ratio("read_1thread", "stats"),
            "unit": "ratio",
        },
    ]
    if with_similarity:  # CKA + cosine of a store with itself: two stores' bytes per pass
        figures.append(
            {"name": "inspect_similarity", "value": 2 * mb / seconds["similarity"], "unit": "MB/s"}
        )
    return [{**f, "value": round(f["value"], 3), **tags} for f in figures]


def inspect_benchmarks(
    quick: bool, root: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """JSON-able figures on float16 uncompressed stores (the default cache) of the tiny
    and bert-base shapes, ~64 MB each when `quick` (under a minute on 2 cores)."""
    rows = {"tiny": 2048, "bert-base": 320} if quick else {"tiny": 8192, "bert-base": 1280}
    repeats = 3 if quick else 5
    figures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-inspect-", dir=root) as tmp:
        for shape, (t, h) in SHAPES.items():
            spec = StoreSpec(num_rows=rows[shape], seq_len=t, hidden_size=h, dtype="float16")
            # CKA over H x H products is compute-bound at H=768; time it on tiny only.
            figures += measure_inspect(spec, Path(tmp), repeats, with_similarity=shape == "tiny")
    return figures


if __name__ == "__main__":
    import json
    import sys

    for figure in inspect_benchmarks(quick="--quick" in sys.argv):
        print(json.dumps(figure))
