"""Which cache mode a stage takes: live, an eager build, or write-through (`--cache auto`).

Costs are counted in layer-rows, the forwards of one frozen layer over one row (the cost
model of docs/design.md; store I/O is not counted: docs/scaling.md says where it decides):

- live: every row a stage reads runs through every frozen layer, every time it is read;
- eager: before training, every row of the corpus through the layers its source store
  lacks (a complete store of the previous stage, else all of them);
- write-through: each row a stage reads, once, through the layers that the deepest earlier
  store holding it lacks. Repeats are read back.

A choice now changes what later stages find stored, so each mode is costed over the rest
of the plan with the later stages in write-through. Write-through never costs more layer
forwards than either other mode; it is taken when it saves any (it writes what it
computes, which pays only if someone reads it back), an eager build when it is strictly
cheaper (never, under these counts: it is there for whole-corpus stores on demand).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cached_mslt.stages.plan import Stage, StagePlan

MODES = ("live", "write-through", "eager")  # ties go to the first: the least I/O


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


def stage_cost(mode: str, stage: Stage, rows: int, reads: int, stored: list[Stored]) -> float:
    """Layer-rows `stage` spends on its frozen bottom in `mode`."""
    if mode == "live":
        return float(stage.frozen_layers * reads)
    if mode == "eager":
        whole = [s.depth for s in stored if s.fraction >= 1 and s.depth <= stage.frozen_layers]
        return float((stage.frozen_layers - max(whole, default=0)) * rows)
    return min(reads, rows) * new_row_cost(stage.frozen_layers, stored)


def stored_after(mode: str, stage: Stage, rows: int, reads: int, stored: list[Stored]):
    """What later stages find stored once `stage` ran in `mode`."""
    if mode == "live":
        return stored
    fraction = 1.0 if mode == "eager" else min(reads, rows) / rows
    return [*stored, Stored(stage.frozen_layers, fraction)]


def choose_cache(
    plan: StagePlan,
    stage: Stage,
    rows: int,
    reads: Callable[[Stage], int],
    stored: list[Stored],
) -> tuple[str, str]:
    """(mode, why) for `stage`: what `stage.cache` asks for, or under `auto` the mode
    whose cost over the rest of the plan (later stages write-through) is lowest."""
    if stage.frozen_layers == 0:
        return "live", "nothing frozen"
    asked = {"never": "live", "always": "eager", "write-through": "write-through"}
    ahead = [s for s in plan.stages if s.index > stage.index and s.frozen_layers and not s.joint]

    def total(mode: str) -> float:
        cost = stage_cost(mode, stage, rows, reads(stage), stored)
        after = stored_after(mode, stage, rows, reads(stage), stored)
        for s in ahead:
            cost += stage_cost("write-through", s, rows, reads(s), after)
            after = stored_after("write-through", s, rows, reads(s), after)
        return cost

    costs = {mode: total(mode) for mode in MODES}
    why = ", ".join(f"{m} {c:,.0f}" for m, c in costs.items()) + " layer-rows to the end"
    if stage.cache in asked:
        return asked[stage.cache], f"cache: {stage.cache} ({why})"
    best = min(MODES, key=lambda m: (costs[m], MODES.index(m)))
    return best, f"auto: {why}"
