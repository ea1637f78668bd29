"""The hot path waits for the device only at sync steps (docs/design.md, the hot path):
over 20 steps of a stage, device reads (`.item()`, `.tolist()`, `.cpu()`, `bool()`,
`int()`, `float()` of a tensor) and collectives happen only every `--sync_every` steps and
at log lines, never inside a step. A counter spies on each of them."""

from __future__ import annotations

import json

import pytest

from cached_mslt.stages.runner import run_stage
from tests.conftest import small_run
from tests.spy import Spy, install
from tests.test_distributed import launch_two_ranks


@pytest.fixture
def spy(monkeypatch) -> Spy:
    return install(Spy(), monkeypatch.setattr)


@pytest.mark.parametrize("stage, cache", [(1, "always"), (2, "always"), (2, "write-through")])
def test_steps_read_the_device_only_at_sync_steps(prepared_dir, tmp_path, spy, stage, cache):
    args = small_run(
        prepared_dir,
        tmp_path / "run",
        cache=cache,
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


# The eager-store case with the slow tests (`make test-slow`): 13 s; write-through's case
# covers the two-rank sync path in the default suite (12 minutes idle, 2026-12-03).
@pytest.mark.parametrize("cache", [pytest.param("always", marks=pytest.mark.slow), "write-through"])
def test_two_ranks_read_the_device_and_agree_only_at_sync_steps(prepared_dir, tmp_path, cache):
    """The same over DDP on two real ranks: the stop decision, budgets and counters are
    agreed at syncs; DDP's gradient all-reduce (in C++, inside backward) is the step's
    only communication and is not counted."""
    run_dir = tmp_path / "run"
    sync = dict(stage_steps="20", log_every=10, sync_every=5, eval_every=1000)
    sync["cache"] = cache
    launch_two_ranks(prepared_dir, run_dir, "1,2", "--spy", checkpoint_every=1000, **sync)
    for rank in (0, 1):
        seen = json.loads((run_dir / f"spy-rank{rank}.json").read_text())
        for stage in ("1", "2"):
            calls = {(place, step, name): n for place, step, name, n in seen[stage]}
            inside = {key: n for key, n in calls.items() if key[0] != "end_step"}
            assert not inside, f"rank {rank} stage {stage}: a step read or communicated: {inside}"
            # and the first step, where the schedule's estimate of the ranks' rate starts
            syncs = [1, 5, 10, 15, 20]
            assert sorted({step for _, step, _ in calls}) == syncs, calls
            agreed = {step for _, step, name in calls if name in ("reduce", "check_trigger")}
            assert sorted(agreed) == syncs, calls  # the ranks agree at every sync
