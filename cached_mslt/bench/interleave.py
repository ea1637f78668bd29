"""Ratios a shared machine cannot fake: interleaved rounds, a stopping rule, a spread.

A round times every function once (in an order that rotates, so none always runs first
after a pause), and a ratio is formed per round from its two sides, which ran seconds
apart: a neighbour that slows the machine slows both. Rounds continue until every ratio
asked for has been stable over the last `window` rounds (max - min within `tolerance` of
their median) or a time cap is hit, and the output says which. The reported value is the
median of the rounds the rule looked at (the stable window, or every round at the cap),
with their min and max.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MIN_CALL_S = 0.05  # functions faster than this are repeated within a round and averaged


@dataclass
class Rounds:
    """Seconds per call of each function, one value per round, and why the rounds ended."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    stopped: str = ""
    window: int = 0  # how many trailing rounds the figures use

    def used(self, name: str) -> list[float]:
        return self.seconds[name][-self.window :]

    def median_s(self, name: str) -> float:
        return statistics.median(self.used(name))

    def per_round(self, slow: str, fast: str) -> list[float]:
        return [s / f for s, f in zip(self.used(slow), self.used(fast), strict=True)]

    def ratio(self, slow: str, fast: str) -> dict[str, Any]:
        """`slow`'s time over `fast`'s, per round: median, min, max, rounds, stop reason."""
        per_round = self.per_round(slow, fast)
        return {
            "value": statistics.median(per_round),
            "min": min(per_round),
            "max": max(per_round),
            "rounds": len(per_round),
            "stopped": self.stopped,
        }


def spread(values: list[float]) -> float:
    """(max - min) / median: 0.1 means the values span 10% of their median."""
    return (max(values) - min(values)) / statistics.median(values)


def _time_call(fn: Callable[[], Any], clock: Callable[[], float] | None = None) -> float:
    clock = clock or time.perf_counter  # looked up per call: tests patch it
    calls, began = 0, clock()
    while True:
        fn()
        calls += 1
        elapsed = clock() - began
        if elapsed >= MIN_CALL_S:
            return elapsed / calls


def interleaved_rounds(
    fns: dict[str, Callable[[], Any]],
    ratios: list[tuple[str, str]],
    *,
    window: int = 5,
    tolerance: float = 0.10,
    cap_s: float = 60.0,
    warmup: int = 1,
    clock: Callable[[], float] | None = None,
) -> Rounds:
    """Time `fns` in interleaved rounds until every (slow, fast) pair of `ratios` spans at
    most `tolerance` over the last `window` rounds, or `cap_s` seconds have passed (never
    fewer than `window` rounds). `clock` times each call: wall time by default (None);
    `time.process_time` for CPU work whose cost includes the process's other threads and
    should not include the time a loaded machine keeps it waiting."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = Rounds({name: [] for name in fns})
    names = list(fns)
    began = time.perf_counter()
    while True:
        k = len(out.seconds[names[0]]) % len(names)
        for name in names[k:] + names[:k]:
            out.seconds[name].append(_time_call(fns[name], clock))
        rounds = len(out.seconds[names[0]])
        if rounds < window:
            continue
        out.window = window
        worst = max(spread(out.per_round(*pair)) for pair in ratios)
        if worst <= tolerance:
            out.stopped = f"stable: spread <= {tolerance:.0%} over the last {window} rounds"
            return out
        if time.perf_counter() - began >= cap_s:
            out.window = rounds
            out.stopped = (
                f"time cap {cap_s:.0f}s after {rounds} rounds (widest ratio spread over the "
                f"last {window}: {worst:.0%})"
            )
            return out
