"""`--cache auto` at run time: the cost model fed with the rates the run measured so far,
and the manifest's record of predicted against actual (docs/scaling.md, "Planning a run").

Each finished stage records in its manifest's `cost_model` the FLOP/s its training steps
reached per process (the clock's counted FLOPs over its training wall seconds) and, for
the mode it ran in, the seconds the cost model predicted beside the seconds it took. The
next stage prices its modes at that rate (a frozen forward at the same rate: nothing
measures it separately yet) and its store I/O at the bandwidth a probe of the stage's
store location measured just before (`storage/bandwidth.py`: one unit-sized write at a
time, one batch of reads at once, on every process; the slowest process's rates, since a
step waits for it). On one CPU thread I/O adds to compute; on a GPU the loader and the
writer overlap it (`Rates.overlap`). The planner (`pipelines/plan.py`) prices I/O the same
way from given or `--measure`d bandwidths.
"""

from __future__ import annotations

import logging
from typing import Any

from accelerate import Accelerator
from accelerate.utils import gather_object

from cached_mslt.config import RunArgs
from cached_mslt.stages.cost_model import ModelShape, Rates, Stored, stage_seconds
from cached_mslt.stages.plan import Stage
from cached_mslt.stages.planner import model_shape
from storage import probe_bandwidth

logger = logging.getLogger(__name__)


def priced_by_previous(
    args: RunArgs,
    previous: dict[str, Any] | None,
    processes: int,
    bandwidth: dict[str, float] | None = None,
    overlap: bool = False,
) -> tuple[ModelShape, Rates] | None:
    """The shape and the rates the previous stage measured, if it recorded any, with the
    store's `bandwidth` (`store_bandwidth`; None: I/O counted free)."""
    measured = ((previous or {}).get("cost_model") or {}).get("measured") or {}
    rate = measured.get("train_flops_per_s")
    if not rate:
        return None
    io = {k: bandwidth[k] for k in ("read_bytes_per_s", "write_bytes_per_s")} if bandwidth else {}
    return model_shape(args), Rates(rate, rate, **io, overlap=overlap, processes=processes)


def store_bandwidth(
    url: str, unit_bytes: int, accelerator: Accelerator, storage_options: dict[str, Any]
) -> dict[str, float] | None:
    """Every process probes the store location at once; the slowest rates each way. None
    if any probe failed (the stage's own first access then says what is wrong)."""
    try:
        rank = f"rank-{accelerator.process_index}"
        mine = probe_bandwidth(url, unit_bytes, name=rank, storage_options=storage_options)
        found = mine.to_dict()
    except Exception as e:  # whatever failed here, every process must still reach the gather
        logger.warning("store bandwidth not measured (I/O priced as free): %s", e)
        found = None
    everyone = gather_object([found])
    if any(f is None for f in everyone):
        return None
    return {k: min(f[k] for f in everyone) for k in everyone[0]}


def predicted(
    priced: tuple[ModelShape, Rates] | None,
    mode: str,
    stage: Stage,
    rows: int,
    reads: int,
    stored: list[Stored],
) -> dict[str, Any] | None:
    """What the cost model expects of `stage` in `mode` at the measured rates."""
    if priced is None:
        return None
    cost = stage_seconds(mode, stage, *priced, rows, reads, stored)
    return {"rates": priced[1].to_dict(), **cost.to_dict()}


def cost_record(
    prediction: dict[str, Any] | None,
    start: dict[str, float],
    before_training: dict[str, float],
    end: dict[str, float],
    stats: dict[str, Any],
    processes: int,
    bandwidth: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The manifest's `cost_model`: this stage's measured rates (training FLOP/s, and the
    store bandwidth its choice was priced at), and predicted vs actual (clock dicts: at
    the stage's start, before its first step, at its end)."""
    train_flops = end["flops"] - before_training["flops"]
    train_s = stats.get("train_s") or 0.0
    rate = train_flops / processes / train_s if train_s > 0 else None
    actual = {"wall_s": end["wall_s"] - start["wall_s"], "cpu_s": end["cpu_s"] - start["cpu_s"]}
    measured = {"train_flops_per_s": rate, "store_bandwidth": bandwidth}
    record: dict[str, Any] = {"measured": measured, "actual": actual}
    if prediction is not None:
        record["predicted"] = prediction
        record["predicted_vs_actual_wall"] = prediction["wall_s"] / actual["wall_s"]
    return record
