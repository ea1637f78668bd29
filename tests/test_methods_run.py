"""Every method runs end to end through the one loop and writes the common metrics fields
and a loadable final checkpoint."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

import cached_mslt.models  # noqa: F401  (registers the pre-LN model with Auto classes)
from cached_mslt.config import MethodArgs
from cached_mslt.methods.harness import METHODS, run_method
from cached_mslt.training.metrics import read_metrics
from tests.conftest import small_run

COMMON_FIELDS = ("step", "tokens", "wall_s", "flops", "train_loss", "stage", "method")


@pytest.mark.parametrize("name", METHODS)
def test_method_runs_and_writes_common_metrics(prepared_dir, tmp_path, name):
    # 4 layers so stacking can go 1 -> 2 -> 4 and the V-cycle can halve the depth; the
    # joint phase gets 2 of the 8 steps (at the default 0.1 it would get none: "short").
    args = small_run(prepared_dir, tmp_path / "unused", eval_every=4)
    method = MethodArgs(budget_tokens=8 * 32 * 8, stacking_layers="1,2,4", mslt_joint_fraction=0.25)
    result = run_method(name, args, method, tmp_path / name)
    assert result["status"] == "ok", result.get("traceback")
    records = read_metrics(tmp_path / name)
    assert records, "no metrics written"
    training = [r for r in records if "event" not in r]
    for field in COMMON_FIELDS:
        assert all(field in r for r in training), field
    # A build's or phase's end and the final evaluation are lines on the same clock.
    for field in ("step", "tokens", "wall_s", "cpu_s", "flops", "stage", "method"):
        assert all(field in r for r in records), field
    assert all(r["method"] == name for r in records)
    assert any(r.get("val_loss") is not None for r in records)
    # The last line is the final model's validation, on the method's whole clock.
    assert records[-1]["event"] == "final" and records[-1]["step"] == result["clock"]["step"]
    assert records[-1]["val_loss"] == result["final_val_loss"]
    assert records[-1]["tokens"] >= method.budget_tokens * 0.9
    assert records[-1]["flops"] > 0
    steps = [r["step"] for r in records]
    assert steps == sorted(steps)
    saved = json.loads((tmp_path / name / "result.json").read_text())
    assert saved["status"] == "ok"
    # The checkpoint and its own tokenizer load together through the Auto classes.
    model = AutoModelForMaskedLM.from_pretrained(saved["final_model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(saved["final_model"])
    assert len(tokenizer) == model.config.vocab_size
    batch = tokenizer(["the river and the city", "a new film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()


def test_failed_method_is_reported_not_raised(prepared_dir, tmp_path):
    args = small_run(prepared_dir, tmp_path / "unused")
    method = MethodArgs(budget_tokens=2048, stacking_layers="1,3,4")  # not a doubling
    result = run_method("stacking", args, method, tmp_path / "stacking")
    assert result["status"] == "failed" and "double" in result["error"]
    assert json.loads((tmp_path / "stacking" / "result.json").read_text())["status"] == "failed"


def test_compare_writes_report_and_plots(prepared_dir, tmp_path):
    from cached_mslt.methods.compare import run_comparison

    args = small_run(prepared_dir, tmp_path / "unused", eval_every=2)
    method = MethodArgs(
        methods=["full", "mslt-live", "mslt-cached"],
        budget_tokens=8 * 32 * 8,
        compare_dir=str(tmp_path / "cmp"),
    )
    text = run_comparison(args, method)
    root = tmp_path / "cmp"
    assert (root / "report.md").read_text() == text
    for png in ("val_loss_vs_wall.png", "val_loss_vs_flops.png"):
        assert (root / png).stat().st_size > 1000
    rows = {r["method"]: r for r in json.loads((root / "report.json").read_text())}
    assert rows["full"]["status"] == rows["mslt-cached"]["status"] == "ok"
    assert rows["full"]["s to baseline loss"] is not None  # the baseline reaches its own loss
    assert "| mslt-cached |" in text
    assert "After stage 1, `mslt-cached`'s validation loss was below `mslt-live`'s" in text


def test_report_adds_finetune_accuracy_columns(tmp_path):
    from cached_mslt.evaluation import PROBE_FILE, RESULTS_FILE
    from cached_mslt.methods.compare import finetune_columns

    out = tmp_path / "full" / "finetune" / "bbc"
    out.mkdir(parents=True)
    (out / RESULTS_FILE).write_text(
        json.dumps({"task": "bbc", "accuracy_mean": 0.8125, "accuracy_std": 0.0125})
    )
    (out / PROBE_FILE).write_text(json.dumps({"task": "bbc", "test_accuracy": 0.7512}))
    assert finetune_columns(tmp_path / "full") == {"bbc acc %": "81.2 ± 1.2", "bbc probe %": "75.1"}
    # The evaluation loads every checkpoint through the Auto classes, the pre-LN one included.
    sizes = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    for model_type, name in (
        ("bert", "BertForSequenceClassification"),
        ("preln-bert", "PreLNBertForSequenceClassification"),
    ):
        config = AutoConfig.for_model(model_type, vocab_size=16, **sizes)
        assert type(AutoModelForSequenceClassification.from_config(config)).__name__ == name


def test_compare_reuse_keeps_finished_runs_and_refuses_other_settings(prepared_dir, tmp_path):
    from cached_mslt.config import ConfigError
    from cached_mslt.methods.compare import run_comparison

    args = small_run(prepared_dir, tmp_path / "unused", eval_every=2)
    root = tmp_path / "cmp"
    method = MethodArgs(methods=["full"], budget_tokens=4 * 32 * 8, compare_dir=str(root))
    run_comparison(args, method)  # a first, separate call trains `full`
    before = (root / "full" / "result.json").read_text()
    method = replace(method, methods=["full", "mslt-live"], reuse=True)
    text = run_comparison(args, method)
    assert (root / "full" / "result.json").read_text() == before  # not trained again
    rows = {r["method"]: r for r in json.loads((root / "report.json").read_text())}
    assert rows["mslt-live"]["status"] == "ok" and rows["full"]["wall / full"] == 1.0
    assert "| mslt-live |" in text and "wall / full" in text
    with pytest.raises(ConfigError, match="budget_tokens"):
        run_comparison(args, replace(method, budget_tokens=8 * 32 * 8))


def test_learning_rate_sweep_keeps_each_method_at_its_best(prepared_dir, tmp_path):
    from cached_mslt.methods.compare import run_comparison

    args = small_run(prepared_dir, tmp_path / "unused", eval_every=4)
    root = tmp_path / "cmp"
    method = MethodArgs(
        methods=["full"],
        budget_tokens=8 * 32 * 8,
        learning_rates=[1e-5, 3e-3],
        compare_dir=str(root),
    )
    report = run_comparison(args, method)
    result = json.loads((root / "full" / "result.json").read_text())
    tried = {t["learning_rate"]: t["final val loss"] for t in result["learning_rate_sweep"]}
    assert set(tried) == {1e-5, 3e-3}
    best = min(tried, key=tried.get)
    # The method's run is the best trial: its metrics and checkpoint, and the report says so.
    kept = read_metrics(root / "full")
    assert kept == read_metrics(root / "full" / f"lr-{best:g}")
    assert (root / "full" / "final" / "config.json").exists()
    assert "learning-rate sweep" in report and f"| full | ok | {best:g} |" in report


def test_short_horizon_sweep_runs_only_the_winner_on_the_whole_budget(prepared_dir, tmp_path):
    from cached_mslt.methods.compare import run_comparison

    args = small_run(prepared_dir, tmp_path / "unused", eval_every=2)
    root = tmp_path / "cmp"
    budget = 8 * 32 * 8
    method = MethodArgs(
        methods=["full"],
        budget_tokens=budget,
        learning_rates=[1e-5, 3e-3],
        sweep_budget_fraction=0.5,
        compare_dir=str(root),
    )
    run_comparison(args, method)
    result = json.loads((root / "full" / "result.json").read_text())
    tried = {t["learning_rate"]: t["final val loss"] for t in result["learning_rate_sweep"]}
    best = min(tried, key=tried.get)
    trials = {lr: read_metrics(root / "full" / "sweep" / f"lr-{lr:g}") for lr in tried}
    assert all(0 < m[-1]["tokens"] <= budget / 2 for m in trials.values())  # half the budget
    assert tried[best] == [r for r in trials[best] if r.get("val_loss")][-1]["val_loss"]
    kept = read_metrics(root / "full")
    assert kept == read_metrics(root / "full" / f"lr-{best:g}")  # the winner, rerun in full
    assert budget / 2 < kept[-1]["tokens"] <= budget
    assert not (root / "full" / f"lr-{max(tried, key=tried.get):g}").exists()


def test_mslt_splits_the_budget_in_the_plans_stage_proportions(prepared_dir, tmp_path):
    from cached_mslt.methods.mslt import stage_weights

    args = small_run(prepared_dir, tmp_path / "unused", stage_steps=None, stage_tokens="3072,1024")
    assert stage_weights(args) == [3072.0, 1024.0]
    method = MethodArgs(methods=["mslt-live"], budget_tokens=4096)
    run_method("mslt-live", args, method, tmp_path / "mslt")
    per_step = 8 * 32  # batch x seq_len
    stage1 = [r["tokens"] for r in read_metrics(tmp_path / "mslt") if r["stage"] == "stage-1"]
    assert 3072 <= max(stage1) < 3072 + per_step  # stage 1 ends on the step that spends 3/4


def test_joint_variant_ends_with_every_layer_training_on_its_share(prepared_dir, tmp_path):
    args = small_run(prepared_dir, tmp_path / "unused", stage_steps=None, stage_tokens="1024,1024")
    method = MethodArgs(budget_tokens=4096, mslt_joint_fraction=0.25)
    result = run_method("mslt-live-joint", args, method, tmp_path / "joint")
    assert result["status"] == "ok", result.get("traceback")
    assert [p["phase"] for p in result["phases"]] == ["stage-1", "stage-2", "joint"]
    records = read_metrics(tmp_path / "joint")
    staged = max(r["tokens"] for r in records if r["stage"] not in ("joint", "final"))
    assert 3072 <= staged < 3072 + 8 * 32  # the stages share 3/4, the joint phase the rest
    plain = run_method("mslt-live", args, method, tmp_path / "plain")
    assert [p["phase"] for p in plain["phases"]] == ["stage-1", "stage-2"]


def test_mslt_methods_sharing_a_first_stage_differ_only_after_it(prepared_dir, tmp_path):
    """--mslt_first_stage_from: mslt-cached starts from mslt-live's stage 1 (the source
    method, given the same option, trains its own). Under a token budget write-through
    stages equal live ones bitwise in float32, so the two runs then end on the same loss."""
    args = small_run(prepared_dir, tmp_path / "unused", stage_steps=None, stage_tokens="2048,1024")
    root = tmp_path / "cmp"
    method = MethodArgs(budget_tokens=4096, mslt_first_stage_from=str(root / "mslt-live"))
    live = run_method("mslt-live", args, method, root / "mslt-live")
    cached = run_method("mslt-cached", replace(args), method, root / "mslt-cached")
    assert live["status"] == cached["status"] == "ok", cached.get("traceback")
    manifests = [
        json.loads((root / m / "stage-1" / "manifest.json").read_text())
        for m in ("mslt-live", "mslt-cached")
    ]
    assert manifests[0] == manifests[1]  # adopted, not retrained
    assert cached["phases"][1]["mode"] == "write-through"
    ours = [r for r in read_metrics(root / "mslt-cached") if r["stage"] == "stage-1"]
    theirs = [r for r in read_metrics(root / "mslt-live") if r["stage"] == "stage-1"]
    assert [{**r, "method": "mslt-live"} for r in ours] == theirs  # its curve, as ours
    assert cached["final_val_loss"] == live["final_val_loss"]
    assert cached["clock"]["tokens"] == live["clock"]["tokens"]

    other = replace(args, train=replace(args.train, learning_rate=2e-3))
    refused = run_method("mslt-cached", other, method, root / "other")
    assert refused["status"] == "failed"
    assert "train.learning_rate" in refused["error"] and "same options" in refused["error"]
    # Under a FLOP budget the plan's stage tokens do not depend on it: the budget check.
    flops = MethodArgs(budget_flops=2e9, mslt_first_stage_from=str(root / "flops"))
    assert run_method("mslt-live", args, flops, root / "flops")["status"] == "ok"
    refused = run_method("mslt-cached", args, replace(flops, budget_flops=4e9), root / "other")
    assert refused["status"] == "failed" and "same budget" in refused["error"]


# slow (`make test-slow`): 7-17 s; the default suite is kept under 10 minutes (2026-12-03)
@pytest.mark.slow
def test_under_a_time_budget_auto_weighs_the_stage_tokens_stage_one_predicts(
    prepared_dir, tmp_path
):
    from cached_mslt.methods.mslt import estimated_stage_tokens

    args = small_run(prepared_dir, tmp_path / "unused", stage_steps=None, stage_tokens="300,100")
    # Stage 1 trains 2 layers (cost 3 x 2 a token); stage 2 runs 2 frozen + 2 trained (2 + 6).
    assert estimated_stage_tokens(args, [300.0, 100.0], 3000) == "3000,750"
    result = run_method("mslt-cached", args, MethodArgs(budget_flops=1e10), tmp_path / "m")
    assert result["status"] == "ok", result.get("traceback")
    decision = result["phases"][1]["cache_decision"]
    stage_two = result["phases"][0]["tokens"] / 3 * 6 / 8
    reads = math.ceil(stage_two / (8 * 32)) * 8  # whole batches of 8 rows of 32 tokens
    assert f"live {2 * reads:,}," in decision, decision  # 2 frozen layers on every row read
