"""A spy on the hot path (docs/design.md): counts device reads and collectives by (where,
step) while a phase loop runs. Used in-process by tests/test_hot_path.py and inside each
rank by tests/scripts/two_rank_spy.py."""

from __future__ import annotations

import threading
from collections import Counter

import torch
import torch.distributed
from accelerate import Accelerator

from cached_mslt.training import trainer

READS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__")
COLLECTIVES = ("reduce", "gather", "check_trigger")


class Spy:
    """Counts device reads and collectives by (where, step) while a phase loop runs."""

    def __init__(self):
        self.calls: Counter[tuple[str, int, str]] = Counter()
        self.where: tuple[str, object] | None = None

    def record(self, name: str) -> None:
        # Only the training thread's calls can stall a step: a background writer (write-
        # through) converts host tensors on its own thread, and waits for the device there.
        if threading.current_thread() is not threading.main_thread():
            return
        if self.where is not None:
            place, loop = self.where
            step = loop.progress.step + (place != "end_step")  # the step being trained
            self.calls[(place, step, name)] += 1

    def wrap(self, name: str, fn):
        def spied(*args, **kwargs):
            self.record(name)
            return fn(*args, **kwargs)

        return spied

    def inside(self, place: str, fn):
        def marked(loop, *args, **kwargs):
            outer, self.where = self.where, (place, loop)
            try:
                return fn(loop, *args, **kwargs)
            finally:
                self.where = outer

        return marked


DISTRIBUTED = ("all_reduce", "all_gather", "broadcast", "barrier")
PLACES = ("stage_batch", "train_step", "end_step")


def install(spy: Spy, setattr_=setattr) -> Spy:
    """Wrap every read, collective and place of the phase loop (`setattr_`: pytest's
    monkeypatch.setattr to undo it after a test)."""
    for name in READS:
        setattr_(torch.Tensor, name, spy.wrap(name, getattr(torch.Tensor, name)))
    for name in COLLECTIVES:
        setattr_(Accelerator, name, spy.wrap(name, getattr(Accelerator, name)))
    for name in DISTRIBUTED:
        setattr_(torch.distributed, name, spy.wrap(name, getattr(torch.distributed, name)))
    for place in PLACES:
        method = getattr(trainer._PhaseLoop, place)
        setattr_(trainer._PhaseLoop, place, spy.inside(place, method))
    return spy
