"""Equal-compute comparisons: every method trains on the same budget of tokens, wall-clock
or FLOPs, stops within one step of it (on every rank at the same step), and its learning
rate follows its progress through its share of the budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import get_scheduler, get_wsd_schedule

from cached_mslt.config import ConfigError, MethodArgs
from cached_mslt.methods.harness import METHODS, run_method
from cached_mslt.training.budget import Budget, PhaseShare, lr_factor
from cached_mslt.training.metrics import RunClock, read_metrics
from tests.conftest import small_run

ROOT = Path(__file__).resolve().parents[1]


def test_spent_share_is_the_largest_over_the_budgets_measures():
    budget = Budget(tokens=1000, wall_s=10.0)
    assert Budget(cpu_s=4.0).spent(RunClock(wall_s=9.0, cpu_s=1.0)) == 0.25
    assert budget.spent(RunClock(tokens=500, wall_s=2.0)) == 0.5
    assert budget.spent(RunClock(tokens=100, wall_s=8.0)) == 0.8
    share = PhaseShare(budget, start=0.5, end=0.75)
    assert share.progress(RunClock(tokens=625)) == 0.5
    assert share.progress(RunClock(tokens=900)) == 1.0
    for bad in ({}, {"wall_s": 0.0}, {"flops": float("inf")}):
        with pytest.raises(ConfigError):
            Budget(**bad)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "wsd"])
def test_progress_schedule_equals_transformers_step_schedule(schedule):
    steps, warmup, decay = 50, 5, 10
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if schedule == "wsd":  # transformers' warmup_stable_decay, decaying linearly
        reference = get_wsd_schedule(
            opt, warmup, decay, num_stable_steps=steps - warmup - decay, decay_type="linear"
        )
    else:
        reference = get_scheduler(schedule, opt, num_warmup_steps=warmup, num_training_steps=steps)
    for step in range(steps):
        factor = lr_factor(step / steps, warmup / steps, schedule, decay / steps)
        assert factor == pytest.approx(reference.get_last_lr()[0], abs=1e-12)
        opt.step()
        reference.step()


def _steps(records):
    """(flops, wall_s) after each optimizer step, in order."""
    return [(r["flops"], r["wall_s"]) for r in records if "train_loss" in r]


@pytest.mark.parametrize("name", METHODS)
def test_every_method_stops_within_one_step_of_a_flop_budget(prepared_dir, tmp_path, name):
    args = small_run(prepared_dir, tmp_path / "unused", eval_every=1000)
    # About 12 steps of the 4-layer model: every method has several phases' worth.
    budget = 12 * 4 * 6 * 2 * 8 * 32 * 33000.0
    method = MethodArgs(budget_flops=budget, stacking_layers="1,2,4")
    result = run_method(name, args, method, tmp_path / name)
    assert result["status"] == "ok", result.get("traceback")
    flops = [f for f, _ in _steps(read_metrics(tmp_path / name))]
    assert flops[-1] >= budget > flops[-2], "must stop on the first step that reaches it"


@pytest.mark.parametrize("name", METHODS)
def test_every_method_ends_within_one_step_of_a_wall_clock_budget(prepared_dir, tmp_path, name):
    args = small_run(prepared_dir, tmp_path / "unused", eval_every=1000)
    method = MethodArgs(budget_wall_s=3.0, stacking_layers="1,2,4")
    result = run_method(name, args, method, tmp_path / name)
    assert result["status"] == "ok", result.get("traceback")
    wall = [w for _, w in _steps(read_metrics(tmp_path / name))]
    assert wall[-1] >= 3.0 >= wall[-2]  # metrics keep 3 decimals


def test_mslt_stages_split_the_budget_evenly(prepared_dir, tmp_path):
    # FLOPs, not wall-clock: deterministic. Stage 1 (2 layers from the embeddings) ends
    # when half the budget is spent; stage 2's cache build and training take the rest.
    args = small_run(prepared_dir, tmp_path / "unused", eval_every=1000)
    budget = 12 * 4 * 6 * 2 * 8 * 32 * 33000.0
    result = run_method("mslt-cached", args, MethodArgs(budget_flops=budget), tmp_path / "m")
    first, second = result["phases"]
    assert first["steps"] > 0 and second["steps"] > 0
    records = [r for r in read_metrics(tmp_path / "m") if "train_loss" in r]
    stage_one = [r["flops"] for r in records if r["stage"] == "stage-1"]
    assert stage_one[-1] >= budget / 2 > stage_one[-2]


def test_learning_rate_decays_to_zero_at_the_end_of_a_wall_budget(prepared_dir, tmp_path):
    args = small_run(prepared_dir, tmp_path / "unused", eval_every=1000, warmup_fraction=0.0)
    run_method("full", args, MethodArgs(budget_wall_s=3.0), tmp_path / "full")
    lrs = [r["lr"] for r in read_metrics(tmp_path / "full") if "lr" in r]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1]
    assert lrs[-1] <= lrs[0] * 0.2  # the last steps run at the end of the decay


# slow (`make test-slow`): 10-31 s each; the default suite took 12 minutes idle (2026-12-03)
@pytest.mark.slow
def test_two_ranks_stop_at_the_same_step_under_a_wall_budget(prepared_dir, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(ROOT / "tests" / "scripts" / "two_rank_budget.py"),
        str(prepared_dir), str(tmp_path / "full"), "full", "3.0",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "both ranks stopped at step" in done.stdout


def test_time_to_target_is_interpolated_between_evaluations():
    from cached_mslt.methods.compare import loss_at, time_to_loss

    records = [
        {"wall_s": 10.0, "cpu_s": 9.0, "val_loss": 7.0},
        {"wall_s": 12.0, "train_loss": 6.0},  # a log line without evaluation is skipped
        {"wall_s": 20.0, "cpu_s": 19.0, "val_loss": 6.0},
        {"wall_s": 30.0, "cpu_s": 29.0, "val_loss": 5.0},
    ]
    assert time_to_loss(records, 6.5) == pytest.approx(15.0)
    assert time_to_loss(records, 6.5, "cpu_s") == pytest.approx(14.0)
    assert time_to_loss(records, 7.5) == 10.0  # already below at the first evaluation
    assert time_to_loss(records, 4.0) is None and time_to_loss(records, None) is None
    assert loss_at(records, 25.0) == pytest.approx(5.5)
    assert loss_at(records, 30.0) == 5.0 and loss_at(records, 31.0) is None


def test_a_cpu_seconds_budget_ends_the_run_within_one_step(prepared_dir, tmp_path):
    args = small_run(prepared_dir, tmp_path / "unused", eval_every=1000)
    result = run_method("full", args, MethodArgs(budget_cpu_s=2.0), tmp_path / "full")
    assert result["status"] == "ok", result.get("traceback")
    cpu = [r["cpu_s"] for r in read_metrics(tmp_path / "full") if "train_loss" in r]
    assert cpu[-1] >= 2.0 >= cpu[-2]  # metrics keep 3 decimals: 1.9996 shows as 2.0


def test_a_cpu_budget_comparison_is_read_in_cpu_seconds(tmp_path):
    from cached_mslt.methods.compare import report_clock, summarize

    # On a shared machine the other method's wall-clock also counted its neighbours.
    curves = {
        "full": [(10.0, 10.0, 7.0), (20.0, 20.0, 6.0)],
        "other": [(30.0, 5.0, 6.5), (60.0, 10.0, 5.9)],
    }
    for name, points in curves.items():
        (tmp_path / name).mkdir()
        lines = [
            {"wall_s": w, "cpu_s": c, "val_loss": v, "flops": 1.0, "tokens": 1}
            for w, c, v in points
        ]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)))
    assert report_clock(MethodArgs(budget_cpu_s=20.0)) == "cpu_s"
    assert report_clock(MethodArgs(budget_wall_s=20.0)) == "wall_s"
    rows = {r["method"]: r for r in summarize(tmp_path, ["full", "other"], clock="cpu_s")}
    assert rows["other"]["s to baseline loss"] == pytest.approx(5 + 5 * 0.5 / 0.6)
    assert rows["other"]["x baseline"] == pytest.approx((5 + 5 * 0.5 / 0.6) / 20)
    assert rows["other"]["val loss @ half"] == pytest.approx(5.9)
    walled = {r["method"]: r for r in summarize(tmp_path, ["full", "other"], clock="wall_s")}
    assert walled["other"]["x baseline"] == pytest.approx(1.5 + 1.5 * 0.5 / 0.6)


def test_lower_share_counts_evaluations_below_the_other_curve():
    from cached_mslt.methods.compare import lower_share

    other = [{"cpu_s": t, "val_loss": 7.0 - 0.1 * t} for t in (0.0, 10.0, 20.0)]  # 7 -> 5
    run = [
        {"cpu_s": 5.0, "val_loss": 6.0},  # before `after`: not counted
        {"cpu_s": 12.0, "val_loss": 5.5},  # other: 5.8 -> lower
        {"cpu_s": 15.0, "val_loss": 5.6},  # other: 5.5 -> not lower
        {"cpu_s": 25.0, "val_loss": 4.0},  # past the other run's end: not comparable
    ]
    assert lower_share(run, other, after=10.0, x="cpu_s") == (1, 2)
