"""Training budgets: how much of a run's compute is spent, in whatever it is counted.

A comparison gives every method the same budget: tokens, wall-clock seconds or model
FLOPs (any of them; the first one used up ends the run). A method splits the budget into
phases by shares (stacking's depths, MSLT's stages, the V-cycle's levels); a phase ends
when the spent share reaches the phase's end, and its learning rate follows the phase's
own progress. So under a wall-clock budget every method finishes its schedule when the
time is up, instead of being cut in the middle of a schedule planned for a token count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cached_mslt.config import ConfigError
from cached_mslt.training.metrics import RunClock

MEASURES = ("tokens", "wall_s", "cpu_s", "flops")
# A phase that trains on less than this part of its share has not really run: a
# comparison marks it (not "ok"), and an MSLT stage does not start a store build that
# would leave it less than this to train on (docs/methods.md, what a report counts).
MIN_TRAINED_SHARE = 0.5


@dataclass(frozen=True)
class Budget:
    tokens: float | None = None
    wall_s: float | None = None  # cache builds included, evaluation excluded (RunClock)
    flops: float | None = None  # model FLOPs as cached_mslt.training.flops counts them
    # CPU seconds of the (slowest) process: on a shared machine, a single-threaded run's
    # CPU time is the compute it got, where wall-clock also counts its neighbours.
    cpu_s: float | None = None

    def __post_init__(self) -> None:
        given = {m: getattr(self, m) for m in MEASURES if getattr(self, m) is not None}
        if not given:
            raise ConfigError("a budget needs tokens, wall-clock seconds or FLOPs")
        bad = {m: v for m, v in given.items() if not (v > 0 and math.isfinite(v))}
        if bad:
            raise ConfigError(f"budgets must be positive and finite, got {bad}")

    def spent(self, clock: RunClock) -> float:
        """The share of the budget used: the largest over the measures it counts."""
        return max(
            getattr(clock, m) / getattr(self, m) for m in MEASURES if getattr(self, m) is not None
        )

    def describe(self) -> str:
        parts = []
        if self.tokens is not None:
            parts.append(f"{self.tokens:,.0f} tokens")
        if self.wall_s is not None:
            parts.append(f"{self.wall_s:,.0f} s wall-clock")
        if self.cpu_s is not None:
            parts.append(f"{self.cpu_s:,.0f} CPU seconds")
        if self.flops is not None:
            parts.append(f"{self.flops / 1e15:,.3f} PFLOPs")
        return " or ".join(parts)


@dataclass(frozen=True)
class PhaseShare:
    """The part of a budget one phase trains on: from the share spent when it began to `end`."""

    budget: Budget
    start: float
    end: float

    def progress(self, clock: RunClock) -> float:
        """How far through the phase the run is, in [0, 1]."""
        width = self.end - self.start
        if width <= 0:
            return 1.0
        return min(1.0, max(0.0, (self.budget.spent(clock) - self.start) / width))


def share_of_flops(budget: Budget, clock: RunClock, flops: float) -> float:
    """The part of `budget` that `flops` more model FLOPs would spend: exact under a FLOP
    budget; under a time budget at the run's own seconds per FLOP so far (0 before
    anything was counted); none of a token budget (a store build reads no training token).
    Several measures: the largest part, as `Budget.spent` counts."""
    parts = [0.0]
    if budget.flops is not None:
        parts.append(flops / budget.flops)
    for measure in ("wall_s", "cpu_s"):
        limit = getattr(budget, measure)
        if limit is not None and clock.flops > 0:
            parts.append(flops * getattr(clock, measure) / clock.flops / limit)
    return max(parts)


def lr_factor(
    progress: float, warmup_fraction: float, schedule: str, decay_fraction: float = 0.2
) -> float:
    """The learning-rate multiplier at `progress` through a phase: linear warmup over
    `warmup_fraction`, then linear or cosine decay to zero (transformers' `linear` and
    `cosine` schedules, driven by progress instead of a step count), or `wsd`: the peak
    held until the last `decay_fraction`, then a linear decay to zero (transformers'
    `warmup_stable_decay` with a linear decay)."""
    if progress < warmup_fraction:
        return progress / warmup_fraction
    if schedule == "wsd":
        decay_from = 1.0 - decay_fraction
        return 1.0 if progress < decay_from else max(0.0, (1.0 - progress) / decay_fraction)
    t = (progress - warmup_fraction) / max(1.0 - warmup_fraction, 1e-12)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    return max(0.0, 1.0 - t)
