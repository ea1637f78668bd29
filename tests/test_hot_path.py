"""The hot path waits for the device only at sync steps (docs/design.md, the hot path):
over 20 steps of a stage, device reads (`.item()`, `.tolist()`, `.cpu()`, `bool()`,
`int()`, `float()` of a tensor) and collectives happen only every `--sync_every` steps and
at log lines, never inside a step. A counter spies on each of them."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from accelerate import Accelerator

from cached_mslt import trainer
from cached_mslt.stages import run_stage
from tests.conftest import small_run

READS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__")
COLLECTIVES = ("reduce", "gather", "check_trigger")


class Spy:
    """Counts device reads and collectives by (where, step) while a phase loop runs."""

    def __init__(self):
        self.calls: Counter[tuple[str, int, str]] = Counter()
        self.where: tuple[str, object] | None = None

    def record(self, name: str) -> None:
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


@pytest.fixture
def spy(monkeypatch) -> Spy:
    spy = Spy()
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, spy.wrap(name, getattr(torch.Tensor, name)))
    for name in COLLECTIVES:
        monkeypatch.setattr(Accelerator, name, spy.wrap(name, getattr(Accelerator, name)))
    monkeypatch.setattr(
        torch.distributed, "all_reduce", spy.wrap("all_reduce", torch.distributed.all_reduce)
    )
    for place in ("stage_batch", "train_step", "end_step"):
        method = getattr(trainer._PhaseLoop, place)
        monkeypatch.setattr(trainer._PhaseLoop, place, spy.inside(place, method))
    return spy


@pytest.mark.parametrize("stage", [1, 2])
def test_steps_read_the_device_only_at_sync_steps(prepared_dir, tmp_path, spy, stage):
    args = small_run(
        prepared_dir,
        tmp_path / "run",
        stage_steps="20",
        log_every=10,
        sync_every=5,
        eval_every=1000,
        checkpoint_every=1000,
    )
    if stage == 2:
        run_stage(args, 1)  # stage 2 needs stage 1; its reads are not counted
        spy.calls.clear()
    run_stage(args, stage)
    assert spy.calls, "the spy saw nothing: it is not wired in"
    inside_steps = {key: n for key, n in spy.calls.items() if key[0] != "end_step"}
    assert not inside_steps, f"a step read the device or ran a collective: {inside_steps}"
    steps = sorted({step for _, step, _ in spy.calls})
    assert steps == [5, 10, 15, 20], spy.calls  # sync steps; 20 also logs and evaluates
