"""The comparison report charges a method for everything it spent against its budget
(issue 31): its cost columns are its clock, store builds included whether or not a step
followed them; its final validation loss is the final model's; a phase that trained
nothing (or too little of its share) is flagged; and an MSLT stage whose store build
would not fit its share runs live and says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForMaskedLM

from cached_mslt.config import MethodArgs
from cached_mslt.data import load_prepared
from cached_mslt.methods.compare import run_comparison
from cached_mslt.methods.harness import phase_shortfall, run_status
from cached_mslt.models import TopModel
from cached_mslt.rundir import RunLayout
from cached_mslt.stages import make_accelerator
from cached_mslt.training import (
    MIN_TRAINED_SHARE,
    Budget,
    RunClock,
    read_metrics,
    share_of_flops,
    validation_loss,
)
from tests.conftest import small_run

# Budgets small enough that stage 2's store build (2 frozen layers over every training
# row of the test corpus: about 1e9 FLOPs, 0.07-0.3 s of CPU depending on the machine and
# its load) costs more than stage 2's share of the budget, while stage 1's share is many
# steps (a slow first step on a loaded machine cannot spend them all). Stage 2 gets a
# sixteenth: at a quarter (0.15 CPU s), a fast CI machine built the store in half of it.
TIGHT_BUDGETS = {"flops": 1e9, "cpu_s": 0.6, "wall_s": 1.0}
STAGE_TOKENS = "15000,1000"  # the proportions the stages split the budget in
# A one-second wall budget holds only on an unloaded machine (under a load of 8 on 2 cores
# stage 1's first step took the whole of it): the wall-clock case runs in `make test-slow`;
# FLOPs and CPU seconds, which load barely moves, run by default.
MEASURES = ["cpu_s", "flops", pytest.param("wall_s", marks=pytest.mark.slow)]


def _compare_mslt_cached(prepared: Path, root: Path, measure: str, over_share: str) -> dict:
    """mslt-cached alone under a tight budget in `measure`, stage 2 on a sixteenth of it;
    returns its report row and text, its result, stage 2's manifest and its metrics."""
    args = small_run(
        prepared,
        root / "unused",
        stage_steps=None,
        stage_tokens=STAGE_TOKENS,
        eval_every=4,
        cache_over_share=over_share,
    )
    method = MethodArgs(
        methods=["mslt-cached"],
        mslt_cache="always",  # eager builds: what the budget rule weighs
        compare_dir=str(root / "cmp"),
        **{f"budget_{measure}": TIGHT_BUDGETS[measure]},
    )
    run_comparison(args, method)
    row = json.loads((root / "cmp" / "report.json").read_text())[0]
    run_dir = root / "cmp" / "mslt-cached"
    return {
        "args": args,
        "row": row,
        "result": RunLayout(run_dir).read_result(),
        "manifest": RunLayout(run_dir).read_manifest(2),
        "metrics": read_metrics(run_dir),
        "report": (root / "cmp" / "report.md").read_text(),
    }


def _assert_cost_is_the_clock(run: dict) -> None:
    """The row's cost columns are the method's clock, and metrics.jsonl ends on it."""
    clock, row, last = run["result"]["clock"], run["row"], run["metrics"][-1]
    assert row["cpu s"] == clock["cpu_s"] and row["wall s"] == clock["wall_s"]
    assert (
        row["PFLOPs"] * 1e15 == pytest.approx(clock["flops"]) and row["tokens"] == clock["tokens"]
    )
    assert last["event"] == "final" and last["flops"] == clock["flops"]
    assert last["cpu_s"] == round(clock["cpu_s"], 3) and last["step"] == clock["step"]


def _final_model_loss(run: dict) -> float:
    """The validation loss of the saved final model, measured afresh."""
    args = run["args"]
    model = AutoModelForMaskedLM.from_pretrained(run["result"]["final_model"])
    valid = load_prepared(args.data.prepared_dir, args.data).valid
    accelerator = make_accelerator(args)
    t = args.train
    return validation_loss(TopModel(model, 0), accelerator, valid, t.batch_size, t.eval_batches)


@pytest.mark.parametrize("measure", MEASURES)
def test_report_charges_builds_flags_the_stage_they_left_empty_and_reads_the_final_model(
    prepared_dir, tmp_path, measure
):
    # `build`: the eager build runs even though it does not fit (the behaviour of issue 31).
    run = _compare_mslt_cached(prepared_dir, tmp_path, measure, "build")
    result, row = run["result"], run["row"]
    stage_two = result["phases"][1]
    assert stage_two["mode"] == "cached" and stage_two["trained_share"] < MIN_TRAINED_SHARE
    if measure == "flops":  # exact: the build alone spends more than the share
        assert stage_two["steps"] == 0
    _assert_cost_is_the_clock(run)
    # metrics.jsonl has the build's end on the clock; with no step after it, the last
    # training line (what the report read before) misses the build.
    training = [r for r in run["metrics"] if "train_loss" in r]
    build = next(r for r in run["metrics"] if r.get("event") == "cache_build")
    assert build["stage"] == "stage-2" and build["cpu_s"] <= result["clock"]["cpu_s"]
    if stage_two["steps"] == 0:
        assert training[-1]["cpu_s"] < build["cpu_s"] and training[-1]["flops"] < build["flops"]
    assert result["status"] == "short" and row["status"].startswith("short: stage-2")
    note = next(n for n in result["status_notes"] if n.startswith("stage-2 trained"))
    assert "store build took" in note and f"- `mslt-cached`: {note}" in run["report"]
    assert row["final val loss"] == result["final_val_loss"]
    assert result["final_val_loss"] == pytest.approx(_final_model_loss(run), abs=1e-6)


@pytest.mark.parametrize("measure", MEASURES)
def test_mslt_stage_whose_build_would_not_fit_its_share_runs_live_and_says_so(
    prepared_dir, tmp_path, measure
):
    run = _compare_mslt_cached(prepared_dir, tmp_path, measure, "live")
    result, row = run["result"], run["row"]
    stage_two = result["phases"][1]
    assert stage_two["mode"] == "live" and stage_two["steps"] > 0
    assert stage_two["cache_decision"].startswith("live under the budget")
    manifest = run["manifest"]
    verdict = manifest["cache"]["live_under_budget"]
    assert manifest["mode"] == "live" and verdict["build_share"] > 1 - MIN_TRAINED_SHARE
    assert result["status"] == "ok" and row["status"] == "ok; live: stage-2"
    assert "- `mslt-cached`: stage-2 ran live: its store build would spend" in run["report"]
    assert not any(r.get("event") == "cache_build" for r in run["metrics"])
    _assert_cost_is_the_clock(run)
    assert result["final_val_loss"] == pytest.approx(_final_model_loss(run), abs=1e-6)


def test_a_build_costs_its_flops_in_the_budgets_own_measure():
    clock = RunClock(wall_s=20.0, cpu_s=10.0, flops=1e9)  # the run so far: 1e8 FLOPs a CPU s
    assert share_of_flops(Budget(flops=4e9), clock, 1e9) == 0.25
    assert share_of_flops(Budget(cpu_s=100.0), clock, 1e9) == pytest.approx(0.1)
    assert share_of_flops(Budget(cpu_s=100.0, wall_s=100.0), clock, 1e9) == pytest.approx(0.2)
    assert share_of_flops(Budget(tokens=1000), clock, 1e9) == 0.0  # a build reads no token
    assert share_of_flops(Budget(cpu_s=100.0), RunClock(), 1e9) == 0.0  # nothing measured yet


def test_a_phase_that_trained_nothing_or_too_little_of_its_share_is_named_with_its_cause():
    ran = {"phase": "stage-1", "steps": 40, "share": [0.0, 0.5], "trained_share": 1.02}
    built = {"phase": "stage-2", "steps": 0, "share": [0.5, 0.75], "trained_share": 0.0}
    built["build_share"] = 1.3
    little = {"phase": "stage-3", "steps": 2, "share": [0.75, 1.0], "trained_share": 0.2}
    squeezed = {"phase": "joint", "steps": 0, "share": [1.01, 1.0], "trained_share": 0.0}
    assert phase_shortfall(ran) is None
    assert phase_shortfall(built) == "trained 0 steps: its store build took 130% of its share"
    assert phase_shortfall(little) == "trained on 20% of its share"
    assert phase_shortfall(squeezed) == "trained 0 steps: the phases before it had spent its share"
    assert phase_shortfall({"phase": "stage-4", "skipped": True, "share": [1.0, 1.0]})
    assert run_status([ran]) == ("ok", [])
    status, notes = run_status([ran, built, little])
    assert status == "short" and [n.split()[0] for n in notes] == ["stage-2", "stage-3"]
