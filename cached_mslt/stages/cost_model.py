"""What a stage costs in seconds: compute at measured or planned FLOP rates, plus store I/O.

The one cost model behind `--cache auto` (`cache_choice.py`) and `pipelines/plan.py`
(docs/scaling.md, "Planning a run"). Per stage and cache mode it counts, for the whole
stage (every process together):

- the training step: `step_flops` of the trained top per row, at `train_flops_per_s`;
- the frozen bottom's forwards, in layer-rows (one frozen layer over one row, the unit of
  `cache_choice`), at `forward_flops_per_s`: every read in `live`, every row of the corpus
  through the layers its source store lacks in `eager` (a build before training), each
  row once through the layers the deepest earlier store holding it lacks in
  `write-through`;
- store bytes: written once per stored row (`write_bytes_per_s`), read once per read of a
  stored row, and by a build from its source store (`read_bytes_per_s`).

Rates are per process; work splits evenly over `processes` (data parallel). A process
either overlaps its I/O with compute (`overlap`: a GPU fed by loader workers and a
background writer, so a step takes the longer of the two) or adds them (one CPU thread
doing both: what CPU seconds measure here).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from types import SimpleNamespace

from cached_mslt.stages.plan import Stage
from cached_mslt.training import layer_forward_flops, step_flops

MODES = ("live", "write-through", "eager")  # ties go to the first: the least I/O
SMALL_ARRAY_BYTES_PER_TOKEN = 5  # attention_mask uint8 + labels int32 (docs/cache-format.md)


@dataclass(frozen=True)
class ModelShape:
    """What the cost of a row depends on: the encoder's width, the head and the store."""

    hidden_size: int
    intermediate_size: int
    vocab_size: int
    seq_len: int
    mask_prob: float
    store_itemsize: float = 2  # bytes per stored hidden value (float16/bfloat16: 2)

    def _config(self) -> SimpleNamespace:
        return SimpleNamespace(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
        )

    @property
    def layer_row_flops(self) -> float:
        """One encoder layer's forward over one row."""
        return self.seq_len * layer_forward_flops(self._config(), self.seq_len)

    def train_row_flops(self, trained_layers: int, embeddings_train: bool) -> float:
        """A training step's FLOPs per row for the top `trained_layers` and the head."""
        return step_flops(
            self._config(),
            tokens=self.seq_len,
            masked_tokens=self.mask_prob * self.seq_len,
            trained_layers=trained_layers,
            frozen_live_layers=0,
            seq_len=self.seq_len,
            decoder_weight_trains=embeddings_train,
        )

    @property
    def row_bytes(self) -> float:
        """A stored row: hidden states, mask, labels and row index."""
        t = self.seq_len
        return t * self.hidden_size * self.store_itemsize + SMALL_ARRAY_BYTES_PER_TOKEN * t + 8


@dataclass(frozen=True)
class Rates:
    """Per process: achieved FLOP/s of a training step and of a frozen forward, store
    bandwidth in bytes/s (inf: free), and whether I/O overlaps compute."""

    train_flops_per_s: float
    forward_flops_per_s: float
    read_bytes_per_s: float = math.inf
    write_bytes_per_s: float = math.inf
    overlap: bool = True
    processes: int = 1
    stage_overhead_s: float = 0.0  # a stage's fixed cost: loading, first steps, saving

    def combine(self, compute_s: float, io_s: float) -> float:
        return max(compute_s, io_s) if self.overlap else compute_s + io_s

    def to_dict(self) -> dict:
        return {k: (None if v == math.inf else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Stored:
    """An earlier store of the run: its depth and the fraction of rows it holds."""

    depth: int
    fraction: float


def new_row_cost(frozen: int, stored: list[Stored]) -> float:
    """Expected layer forwards for a row read for the first time at a stage with `frozen`
    layers: from the deepest store that holds it (stores hold independent random subsets)."""
    cost, missing = 0.0, 1.0
    for s in sorted(stored, key=lambda s: -s.depth):
        cost += missing * s.fraction * (frozen - s.depth)
        missing *= 1 - s.fraction
    return cost + missing * frozen


def layer_rows(mode: str, stage: Stage, rows: int, reads: float, stored: list[Stored]) -> float:
    """Layer-rows `stage` spends on its frozen bottom in `mode`."""
    f = stage.frozen_layers
    if mode == "live":
        return float(f * reads)
    if mode == "eager":
        return float((f - source_depth(stage, stored)) * rows)
    if mode == "write-through":
        return min(reads, rows) * new_row_cost(f, stored)
    raise ValueError(f"unknown cache mode {mode!r}; expected one of {MODES}")


def source_depth(stage: Stage, stored: list[Stored]) -> int:
    """The deepest complete earlier store an eager build starts from (0: token ids)."""
    whole = [s.depth for s in stored if s.fraction >= 1 and s.depth <= stage.frozen_layers]
    return max(whole, default=0)


@dataclass(frozen=True)
class StageCost:
    """One stage in one mode: counts for the whole stage, seconds per process."""

    mode: str
    rows_read: float
    layer_rows: float  # frozen-layer forwards (the unit `--cache auto` counts without rates)
    bytes_written: float
    bytes_read: float
    build_s: float  # an eager build before training
    compute_s: float  # the training steps' compute, frozen forwards included
    io_s: float  # the training steps' store I/O
    train_s: float  # the two combined (Rates.combine)
    processes: int = 1
    overhead_s: float = 0.0  # Rates.stage_overhead_s

    @property
    def wall_s(self) -> float:
        return self.overhead_s + self.build_s + self.train_s

    @property
    def bound(self) -> str:
        """What a training step waits for: compute or the store."""
        return "I/O" if self.io_s > self.compute_s else "compute"

    def step_s(self, rows_per_step: int) -> float:
        """Seconds of one step of `rows_per_step` rows on each process."""
        return self.train_s * self.processes * rows_per_step / max(self.rows_read, 1e-30)

    def to_dict(self) -> dict:
        return asdict(self) | {"wall_s": self.wall_s, "bound": self.bound}


def stage_seconds(
    mode: str,
    stage: Stage,
    shape: ModelShape,
    rates: Rates,
    rows: int,
    reads: float,
    stored: list[Stored],
) -> StageCost:
    """What `stage` costs in `mode` reading `reads` rows of a corpus of `rows` rows, with
    the earlier stores `stored`."""
    f, p, rb = stage.frozen_layers, rates.processes, shape.row_bytes
    forward_s = shape.layer_row_flops / rates.forward_flops_per_s  # per layer-row
    flops = shape.train_row_flops(stage.trainable_layers, f == 0)
    compute = reads * flops / rates.train_flops_per_s
    count = layer_rows(mode, stage, rows, reads, stored)
    written = train_read = source_read = build_s = 0.0
    if mode == "eager":
        written, source_read = rows * rb, (rows * rb if source_depth(stage, stored) else 0.0)
        io = written / rates.write_bytes_per_s + source_read / rates.read_bytes_per_s
        build_s = rates.combine(count * forward_s, io) / p
        train_read = reads * rb
    else:
        compute += count * forward_s
    if mode == "write-through":
        first = min(reads, rows)  # rows computed and written; the rest are read back
        held = 1.0 - math.prod(1 - s.fraction for s in stored if s.depth <= f)
        written, train_read = first * rb, (first * held + reads - first) * rb
    train_write = 0.0 if mode == "eager" else written  # the build's writes are in build_s
    io = (train_write / rates.write_bytes_per_s + train_read / rates.read_bytes_per_s) / p
    compute /= p
    read = source_read + train_read
    return StageCost(
        mode,
        reads,
        count,
        written,
        read,
        build_s,
        compute,
        io,
        rates.combine(compute, io),
        p,
        rates.stage_overhead_s,
    )


def stored_after(mode: str, stage: Stage, rows: int, reads: float, stored: list[Stored]):
    """What later stages find stored once `stage` ran in `mode`."""
    if mode == "live" or stage.frozen_layers == 0:
        return stored
    fraction = 1.0 if mode == "eager" else min(reads, rows) / rows
    return [*stored, Stored(stage.frozen_layers, fraction)]
