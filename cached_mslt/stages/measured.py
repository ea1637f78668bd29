"""`--cache auto` at run time: the cost model fed with the rates the run measured so far,
and the manifest's record of predicted against actual (docs/scaling.md, "Planning a run").

Each finished stage records in its manifest's `cost_model` the FLOP/s its training steps
reached per process (the clock's counted FLOPs over its training wall seconds) and, for
the mode it ran in, the seconds the cost model predicted beside the seconds it took. The
next stage prices its modes at that rate (a frozen forward at the same rate: nothing
measures it separately yet). Store bandwidth is not measured at run time, so it is
counted free, and at these rates the ranking of modes is the layer-row count's; the
planner (`pipelines/plan.py`) prices I/O from given or `--measure`d bandwidths.
"""

from __future__ import annotations

from typing import Any

from cached_mslt.config import RunArgs
from cached_mslt.stages.cost_model import ModelShape, Rates, Stored, stage_seconds
from cached_mslt.stages.plan import Stage
from cached_mslt.stages.planner import model_shape


def priced_by_previous(
    args: RunArgs, previous: dict[str, Any] | None, processes: int
) -> tuple[ModelShape, Rates] | None:
    """The shape and the rates the previous stage measured, if it recorded any."""
    measured = ((previous or {}).get("cost_model") or {}).get("measured") or {}
    rate = measured.get("train_flops_per_s")
    if not rate:
        return None
    return model_shape(args), Rates(rate, rate, overlap=False, processes=processes)


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
) -> dict[str, Any]:
    """The manifest's `cost_model`: this stage's measured rate, and predicted vs actual
    (clock dicts: at the stage's start, before its first step, at its end)."""
    train_flops = end["flops"] - before_training["flops"]
    train_s = stats.get("train_s") or 0.0
    rate = train_flops / processes / train_s if train_s > 0 else None
    actual = {"wall_s": end["wall_s"] - start["wall_s"], "cpu_s": end["cpu_s"] - start["cpu_s"]}
    record: dict[str, Any] = {"measured": {"train_flops_per_s": rate}, "actual": actual}
    if prediction is not None:
        record["predicted"] = prediction
        record["predicted_vs_actual_wall"] = prediction["wall_s"] / actual["wall_s"]
    return record
