"""Write-through: a stage's store filled by its own training steps, no separate build.

A frozen bottom in eval mode is a pure function of its statically masked row, so what a
live step computes for a row *is* that row's store entry. A write-through stage reads the
rows its store already has; for the others it computes the entry as a live step would
(from the deepest earlier store of the run that has the row, through only the layers it
lacks, else from the token ids), trains on both alike, and hands what it computed to a
background writer. Every frozen layer then runs at most once per row over the whole
schedule, and only for rows a stage reads (docs/design.md, invariant 9).

The unit of presence is one shard of one chunk of `block_rows` rows: the loader's block,
so a batch is whole units. A unit is visible once its marker is set, after its arrays
(`ActivationStore.write_shard`): a killed writer leaves no partial unit, and two ranks
that compute the same unit write the same bytes, so a race is harmless. Rows are rounded
to the store's dtype before the top sees them, whether read or computed, so a stage trains
the same whichever rows its store held when it started (resume, other ranks).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import BertForMaskedLM

from cached_mslt.data import PreparedBlocks
from cached_mslt.stages.cache import frozen_output
from storage import ActivationStore, StoreSpecError

_END = object()


class Pending:
    """Units this process computed and has not written yet: unit -> its host rows. A block
    read ahead before its unit was computed takes the rows from here instead of computing
    them again (shared by the step, the dataset in the main process and the writer)."""

    def __init__(self) -> None:
        self._rows: dict[int, tuple[dict[str, torch.Tensor], Any]] = {}
        self._lock = threading.Lock()

    def add(self, unit: int, rows: dict[str, torch.Tensor], ready=None) -> None:
        """`ready`: the CUDA event of the rows' copy to the host (None on a CPU)."""
        with self._lock:
            self._rows[unit] = (rows, ready)

    def get(self, unit: int) -> torch.Tensor | None:
        with self._lock:
            rows, ready = self._rows.get(unit, (None, None))
        if ready is not None:
            ready.synchronize()  # rare: a unit needed again before its copy was written
        return None if rows is None else rows["hidden"]

    def written(self, unit: int) -> None:
        with self._lock:
            self._rows.pop(unit, None)


@dataclass
class Source:
    """An earlier store of the run: entries at depth `depth` for the rows it holds."""

    store: ActivationStore
    depth: int
    done: set[int] = field(default_factory=set)  # its shards marked done (it no longer changes)

    @classmethod
    def of(cls, store: ActivationStore) -> Source:
        return cls(store, int(store.fingerprint["frozen_layers"]), set(store.shards_done()))

    def holds(self, start: int, stop: int) -> bool:
        return all(s in self.done for s in self.store.shards_of_rows(start, stop))


class WriteThroughBlocks(Dataset):
    """Block i of the prepared rows (token ids, labels, masks), plus `hidden`: the rows'
    entry in the stage's store where it has them (`depth` = the store's), else their entry
    in the deepest earlier store that has them (its depth), else zeros (depth 0: computed
    from the token ids). Same blocks, order and keys as the live and cached loaders."""

    def __init__(
        self,
        prepared: PreparedBlocks,
        store: ActivationStore,
        sources: list[Source],
        pending: Pending | None = None,
    ):
        spec, complete = store.spec, store.is_complete
        units_are_blocks = spec.chunks_per_shard == 1 and spec.rows_per_chunk == prepared.block_rows
        if not complete and not units_are_blocks:
            raise StoreSpecError(
                f"{store.url}: a write-through store has one shard per loader block "
                f"({prepared.block_rows} rows); it has {spec.chunks_per_shard} chunk(s) of "
                f"{spec.rows_per_chunk} rows per shard. Rebuild it with --rebuild_cache"
            )
        self.prepared, self.store, self.pending = prepared, store, pending
        self.block_rows, self.num_rows = prepared.block_rows, prepared.num_rows
        self.depth = int(store.fingerprint["frozen_layers"])
        self.sources = sorted(sources, key=lambda s: -s.depth)  # deepest first
        # A complete store (any layout) is only read; an incomplete one has a unit per block.
        self.present = set(range(len(prepared))) if complete else set(store.shards_done())

    def __len__(self) -> int:
        return len(self.prepared)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        blocks = [self.prepared[i] for i in indices]
        shape = (self.store.spec.seq_len, self.store.spec.hidden_size)
        dtype = self.store.spec.torch_dtype
        for block in blocks:
            block["hidden"] = torch.zeros((len(block["row_index"]), *shape), dtype=dtype)
            block["depth"] = torch.zeros(len(block["row_index"]), dtype=torch.long)
        self._fill(indices, blocks)
        return blocks

    def _fill(self, indices: list[int], blocks: list[dict]) -> None:
        """Each block's best entry: this store's, or the deepest earlier one (one concurrent
        read per store)."""
        wanted = {i: self.prepared_range(i) for i in indices}
        mine = [i for i in indices if self._has(i)]
        todo = [i for i in indices if i not in mine]
        reads = [(self.store, self.depth, mine)]
        for source in self.sources:
            held = [i for i in todo if source.holds(*wanted[i])]
            todo = [i for i in todo if i not in held]
            reads.append((source.store, source.depth, held))
        where = dict(zip(indices, blocks, strict=True))
        for store, depth, units in reads:
            if not units:
                continue
            parts = store.read_blocks([wanted[i] for i in units], arrays=("hidden",))
            for i, part in zip(units, parts, strict=True):
                where[i]["hidden"], where[i]["depth"][:] = part["hidden"], depth
        if self.pending is not None:  # computed here, still queued for writing
            for i in todo:
                if (rows := self.pending.get(i)) is not None:
                    where[i]["hidden"], where[i]["depth"][:] = rows, self.depth

    def prepared_range(self, i: int) -> tuple[int, int]:
        start = i * self.block_rows
        return start, min(start + self.block_rows, self.num_rows)

    def _has(self, unit: int) -> bool:
        """Known present, or written since (by this rank's writer or another rank's):
        markers never unset while a stage runs, so a positive answer is kept."""
        if unit not in self.present and self.store.is_shard_done(unit):
            self.present.add(unit)
        return unit in self.present

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "pending": None}  # workers see written units only


@dataclass
class FillPlan:
    """What a step computes for a batch: per depth, the batch positions whose entry starts
    there, and the units those rows form (written once computed)."""

    groups: list[tuple[int, torch.Tensor]]  # (start depth, positions)
    units: list[tuple[int, int, int, dict[str, torch.Tensor]]]  # (unit, a, b, host rows)
    layer_tokens: int  # frozen layer forwards of the batch, in tokens


class UnitWriter:
    """Writes computed units with `store.write_shard` on a background thread, at most
    `depth` queued. The time the step waits for room is measured (`stall_s`): a writer
    that cannot keep up shows there, never as lost or partial units."""

    def __init__(self, store: ActivationStore, pending: Pending, depth: int = 8):
        self.store, self.pending = store, pending
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.stall_s, self.units = 0.0, 0
        self.thread = threading.Thread(target=self._run, name="unit-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not _END:
            unit, rows, ready = item
            if self.error is None:  # after a failure, drain without writing
                try:
                    if ready is not None:
                        ready.synchronize()  # the device-to-host copy of the rows
                    self.store.write_shard(unit, **rows)
                    self.units += 1
                except BaseException as e:
                    self.error = e
            self.pending.written(unit)

    def put(self, unit: int, rows: dict[str, torch.Tensor], ready=None) -> None:
        if self.error is not None:
            raise self.error
        self.pending.add(unit, rows, ready)
        began = time.perf_counter()
        self.queue.put((unit, rows, ready))
        self.stall_s += time.perf_counter() - began

    def close(self, raise_error: bool = True) -> None:
        """Wait until every queued unit is written; raise the first failure."""
        if self.thread.is_alive():
            self.queue.put(_END)
            self.thread.join()
        if raise_error and self.error is not None:
            raise self.error


class WriteThrough:
    """The trainer's `fill` for a write-through stage: `plan` a host batch (which rows to
    compute, from which depth), then in the step `hidden` computes them, writes them
    through and returns the whole batch's entries."""

    def __init__(
        self,
        model: BertForMaskedLM,
        blocks: WriteThroughBlocks,
        writer: UnitWriter,
        round_at: tuple[int, ...],
    ):
        self.model, self.blocks, self.writer, self.round_at = model, blocks, writer, round_at
        self.depth, self.dtype = blocks.depth, blocks.store.spec.rounding
        self.seq_len = blocks.store.spec.seq_len
        self.computed: set[int] = set()  # units this process computed, this stage
        self.counts = {"units_read": 0, "units_computed": 0, "layer_rows": 0}

    def plan(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """On the host, before the batch moves: group the rows to compute by the depth
        their entry starts at (a block read ahead before this process computed its unit
        takes the computed rows instead)."""
        depth, units, rpc = batch.pop("depth").numpy(), [], self.blocks.block_rows
        row_index = batch["row_index"].numpy()
        for a in range(0, len(depth), rpc):
            b = min(a + rpc, len(depth))
            unit = int(row_index[a]) // rpc
            if depth[a] < self.depth and unit in self.computed:
                batch["hidden"][a:b] = self._computed_rows(unit)
                depth[a:b] = self.depth
            if depth[a] < self.depth:
                self.computed.add(unit)
                rows = {k: batch[k][a:b] for k in ("attention_mask", "labels", "row_index")}
                units.append((unit, a, b, rows))
        groups = [
            (int(d), torch.from_numpy(np.flatnonzero(depth == d)))
            for d in np.unique(depth)
            if d < self.depth
        ]
        layers = sum((self.depth - d) * len(pos) for d, pos in groups)
        self.counts["units_read"] += -(-len(depth) // rpc) - len(units)
        self.counts["units_computed"] += len(units)
        self.counts["layer_rows"] += layers
        return {**batch, "fill": FillPlan(groups, units, layers * self.seq_len)}

    def _computed_rows(self, unit: int) -> torch.Tensor:
        rows = self.writer.pending.get(unit)
        if rows is not None:
            return rows
        a, b = self.blocks.prepared_range(unit)  # written since: read it back
        return self.blocks.store.read_blocks([(a, b)], arrays=("hidden",))[0]["hidden"]

    @torch.no_grad()
    def hidden(self, batch: dict[str, Any]) -> torch.Tensor:
        """In the step (under the top's autocast, no grad): the batch's entries, the
        planned rows computed and handed to the writer. Reads nothing from the device."""
        plan: FillPlan = batch["fill"]
        hidden = batch["hidden"]
        if not plan.groups:
            return hidden
        device, mask = hidden.device, batch["attention_mask"]
        for start, positions in plan.groups:
            at = positions.to(device, non_blocking=True)
            rows_mask = None if mask is None else mask[at]
            inputs = (
                {"input_ids": batch["input_ids"][at]}
                if start == 0
                else {"previous": hidden[at], "start": start}
            )
            out = frozen_output(
                self.model,
                rows_mask,
                stop=self.depth,
                dtype=self.dtype,
                round_at=self.round_at,
                **inputs,
            )
            hidden = hidden.index_copy(0, at, out)
        self._write(plan, hidden)
        return hidden

    def _write(self, plan: FillPlan, hidden: torch.Tensor) -> None:
        """Hand each computed unit to the writer. On a GPU the units' rows go to one pinned
        host buffer per batch, copied without waiting: the writer waits for the copy's
        event, the step does not."""
        ready, rows = None, {}
        if hidden.device.type == "cuda":
            host = torch.empty(
                (sum(b - a for _, a, b, _ in plan.units), *hidden.shape[1:]),
                dtype=hidden.dtype,
                pin_memory=True,
            )
            at = 0
            for unit, a, b, _ in plan.units:
                rows[unit] = host[at : at + b - a]
                rows[unit].copy_(hidden[a:b], non_blocking=True)
                at += b - a
            ready = torch.cuda.Event()
            ready.record()
        else:  # their own rows: the batch's tensor lives on in the step
            rows = {unit: hidden[a:b].clone() for unit, a, b, _ in plan.units}
        for unit, _, _, small in plan.units:
            self.writer.put(unit, {"hidden": rows[unit], **small}, ready)

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "write_stall_s": self.writer.stall_s}
