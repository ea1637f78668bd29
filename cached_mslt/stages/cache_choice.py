"""Which cache mode a stage takes: live, an eager build, or write-through (`--cache auto`).

Each mode is costed by `cost_model.stage_seconds` over the rest of the plan, with the
later stages in write-through (a choice now changes what later stages find stored):

- live: every row a stage reads runs through every frozen layer, every time it is read;
- eager: before training, every row of the corpus through the layers its source store
  lacks (a complete store of the previous stage, else all of them);
- write-through: each row a stage reads, once, through the layers that the deepest earlier
  store holding it lacks. Repeats are read back.

Without rates the cost is the frozen-layer forwards alone, in layer-rows (store I/O free):
write-through never costs more than either other mode and is taken when it saves any (it
writes what it computes, which pays only if someone reads it back). With rates (measured
by the run's earlier stages, or given to the planner) the cost is seconds, store I/O
included, and a slow store can make live the cheapest (docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Callable

from cached_mslt.stages.cost_model import (
    MODES,
    ModelShape,
    Rates,
    Stored,
    layer_rows,
    new_row_cost,
    stage_seconds,
    stored_after,
)
from cached_mslt.stages.plan import Stage, StagePlan

__all__ = ["MODES", "Stored", "choose_cache", "mode_costs", "new_row_cost", "stage_cost"]

stage_cost = layer_rows  # the name the layer-row count had before it had a rate


def mode_costs(
    plan: StagePlan,
    stage: Stage,
    rows: int,
    reads: Callable[[Stage], float],
    stored: list[Stored],
    priced: tuple[ModelShape, Rates] | None = None,
) -> dict[str, float]:
    """Each mode's cost for `stage` and every later stage in write-through: seconds per
    process with `priced`, else layer-rows."""
    ahead = [s for s in plan.stages if s.index > stage.index and s.frozen_layers and not s.joint]

    def cost(mode: str, s: Stage, before: list[Stored]) -> float:
        if priced is None:
            return layer_rows(mode, s, rows, reads(s), before)
        return stage_seconds(mode, s, *priced, rows, reads(s), before).wall_s

    def total(mode: str) -> float:
        spent = cost(mode, stage, stored)
        after = stored_after(mode, stage, rows, reads(stage), stored)
        for s in ahead:
            spent += cost("write-through", s, after)
            after = stored_after("write-through", s, rows, reads(s), after)
        return spent

    return {mode: total(mode) for mode in MODES}


def choose_cache(
    plan: StagePlan,
    stage: Stage,
    rows: int,
    reads: Callable[[Stage], float],
    stored: list[Stored],
    priced: tuple[ModelShape, Rates] | None = None,
) -> tuple[str, str]:
    """(mode, why) for `stage`: what `stage.cache` asks for, or under `auto` the mode
    whose cost over the rest of the plan (later stages write-through) is lowest."""
    if stage.frozen_layers == 0:
        return "live", "nothing frozen"
    asked = {"never": "live", "always": "eager", "write-through": "write-through"}
    counts = mode_costs(plan, stage, rows, reads, stored)
    why = ", ".join(f"{m} {c:,.0f}" for m, c in counts.items()) + " layer-rows to the end"
    costs = counts
    if priced is not None:
        costs = mode_costs(plan, stage, rows, reads, stored, priced)
        seconds = ", ".join(f"{m} {c:,.1f}" for m, c in costs.items())
        why += f"; {seconds} s at the measured rates"
    if stage.cache in asked:
        return asked[stage.cache], f"cache: {stage.cache} ({why})"
    # ties (to rounding: seconds add the same work in different orders) go to the least I/O
    cheapest = min(costs.values())
    best = next(m for m in MODES if costs[m] <= cheapest * (1 + 1e-9))
    return best, f"auto: {why}"
