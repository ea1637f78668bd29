"""Write-through's step against the steps it stands in for, in the same interleaved rounds
(docs/benchmarks.md): a batch whose rows the store holds against today's cached step fed
from a store on disk, and a batch whose rows it lacks (computed, then handed to the
writer) against a live step. The trainer's step throughout (`trainer_step`).
Run: `python pipelines/bench.py --variants write-through`.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Iterator

import torch

from cached_mslt.bench.interleave import interleaved_rounds
from cached_mslt.bench.steps import _FakePrepared, _store_feed, cached_case, trainer_step
from cached_mslt.data import PreparedBlocks
from cached_mslt.models import bottom_forward
from cached_mslt.stages import (
    Pending,
    UnitWriter,
    WriteThrough,
    WriteThroughBlocks,
    block_rows_for,
)
from storage import ActivationStore, StoreSpec, make_block_loader

# (slow, fast): each figure is the first one's step time over the second's, so >= 0.95
# means write-through costs at most ~5% more than the step it replaces.
RATIOS = {
    "write_through_stored_vs_cached_step": ("store", "stored"),
    "write_through_missing_vs_live_step": ("live", "missing"),
}


def write_through_benchmarks(
    preset: str,
    *,
    frozen: int = 9,
    layers: int = 12,
    batch_rows: int = 32,
    seq_len: int = 128,
    cap_s: float = 60.0,
    window: int = 5,
) -> list[dict]:
    torch.set_flush_denormal(True)
    model, data, hidden16 = cached_case(preset, frozen, batch_rows, seq_len, layers)
    copies = 16
    rows = {k: v.repeat(copies, *[1] * (v.dim() - 1)) for k, v in data.items()}
    hidden = hidden16.repeat(copies, 1, 1)

    @torch.no_grad()
    def live() -> dict:
        ids, mask = data["input_ids"], data["attention_mask"]
        return {**data, "hidden_states": bottom_forward(model, ids, mask, frozen)}

    with tempfile.TemporaryDirectory(prefix="bench-wt-") as tmp:
        feeds = {
            "store": _store_feed(f"{tmp}/store", hidden16, data, copies=8),
            "live": live,
            "stored": _WriteThroughFeed(model, frozen, f"{tmp}/full", rows, batch_rows, hidden),
            "missing": _WriteThroughFeed(model, frozen, f"{tmp}/empty", rows, batch_rows),
        }
        fns = {name: trainer_step(model, frozen, feed) for name, feed in feeds.items()}
        # Process CPU time: the writer thread's work is the cost to count, and wall time on
        # a shared machine measures the neighbours (docs/benchmarks.md).
        rounds = interleaved_rounds(
            fns, list(RATIOS.values()), window=window, cap_s=cap_s, clock=time.process_time
        )
        for feed in feeds.values():
            getattr(feed, "close", lambda: None)()
        computed = {k: feeds[k].computed for k in ("stored", "missing")}
    if computed["stored"] or not computed["missing"]:  # each must time what it says
        raise RuntimeError(f"write-through bench fed the wrong rows: units computed {computed}")
    tag = {"preset": preset, "frozen": frozen, "batch_rows": batch_rows, "clock": "process CPU"}
    return [
        {"name": name, **rounds.ratio(*pair), "unit": "x", "model_ratio": 1.0, **tag}
        for name, pair in RATIOS.items()
    ]


class _WriteThroughFeed:
    """Batches as a write-through stage takes them, endlessly: `hidden` given, every unit
    is stored before the first batch (the store is read back); else every batch computes
    its rows and writes them, and each pass starts over on a new empty store so no row is
    ever stored when it is read."""

    def __init__(self, model, frozen, url, rows, batch_rows, hidden=None):
        self.model, self.frozen, self.url, self.rows = model, frozen, url, rows
        self.batch_rows, self.hidden, self.fill, self.done = batch_rows, hidden, None, 0
        self.stream = self._batches()

    def __call__(self) -> dict:
        batch = next(self.stream)  # first: a new pass sets up self.fill
        batch = self.fill.plan(batch)
        return {
            "labels": batch["labels"],
            "attention_mask": batch["attention_mask"],
            "hidden_states": self.fill.hidden(batch).float(),  # as the trainer widens it
        }

    def _batches(self) -> Iterator[dict]:
        for n in itertools.count():
            loader = self._start(f"{self.url}-{n}")
            loader.set_epoch(0)
            yield from loader
            if self.hidden is not None:  # a full store: read it again, forever
                yield from self._epochs(loader)

    def _epochs(self, loader) -> Iterator[dict]:
        for epoch in itertools.count(1):
            loader.set_epoch(epoch)
            yield from loader

    def _start(self, url: str):
        """A new store (filled when `hidden` is given), its WriteThrough and loader."""
        self.close()
        n, seq_len = self.rows["input_ids"].shape
        block = block_rows_for(self.batch_rows)
        spec = StoreSpec(
            num_rows=n,
            seq_len=seq_len,
            hidden_size=self.model.config.hidden_size,
            rows_per_chunk=block,
            chunks_per_shard=1,
        )
        store = ActivationStore.create(url, spec, fingerprint={"frozen_layers": str(self.frozen)})
        if self.hidden is not None:
            for unit in range(store.num_shards):
                a, b = store.shard_rows(unit)
                small = {k: self.rows[k][a:b] for k in ("attention_mask", "labels")}
                store.write_shard(
                    unit, hidden=self.hidden[a:b], row_index=torch.arange(a, b), **small
                )
        prepared = PreparedBlocks(_FakePrepared(self.rows), block_rows=block)
        pending = Pending()
        blocks = WriteThroughBlocks(prepared, store, [], pending)
        self.fill = WriteThrough(self.model, blocks, UnitWriter(store, pending), ())
        return make_block_loader(blocks, rows_per_batch=self.batch_rows, shuffle=True, seed=0)

    @property
    def computed(self) -> int:
        """Units computed so far (over every pass)."""
        return self.done + (self.fill.counts["units_computed"] if self.fill else 0)

    def close(self) -> None:
        if self.fill is not None:
            self.fill.writer.close()
            self.done += self.fill.counts["units_computed"]
            self.fill = None
