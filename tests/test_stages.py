"""Staged training end to end on a small model: docs/design.md invariants 1, 2, 4, 5 and 7 at the
level of whole stages, plus resume and the entry points' refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from transformers import AutoTokenizer, BertForMaskedLM

from cached_mslt.config import ConfigError
from cached_mslt.data.prepare import load_prepared
from cached_mslt.rundir import RunLayout
from cached_mslt.stages.runner import StageError, run_all, run_stage
from cached_mslt.training import checkpointing, trainer
from cached_mslt.training.metrics import read_metrics
from storage import StaleStoreError
from tests.conftest import replace_stage_model, small_run


def params(path):
    return BertForMaskedLM.from_pretrained(path).state_dict()


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_full_schedule_writes_loadable_tied_checkpoint_and_metrics(prepared_dir, tmp_path):
    args = small_run(prepared_dir, tmp_path / "run")
    manifests = run_all(args)
    assert [m["mode"] for m in manifests] == ["live", "cached"]
    final = RunLayout.of(args).stage_dir(2) / "model"
    model = BertForMaskedLM.from_pretrained(final).eval()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.config.num_hidden_layers == 4
    records = read_metrics(tmp_path / "run")
    for field in ("step", "tokens", "wall_s", "flops", "train_loss", "lr", "stage"):
        assert all(field in r for r in records), field
    assert any("val_loss" in r for r in records)
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert (tmp_path / "run" / "val_loss.png").exists()
    # Every loss is shown beside the unigram loss of the data it was measured on.
    unigram = load_prepared(prepared_dir).manifest["unigram_loss"]
    assert (
        f"Unigram loss of the validation targets (token frequencies alone): {unigram:.3f}"
        in summary
    )
    assert "below unigram %" in summary
    # Speeds come with their MFU against the reference the run recorded (docs/benchmarks.md).
    assert "MFU %" in summary and (tmp_path / "run" / "peak.json").is_file()
    # The checkpoint loads with its own tokenizer, the one the data was prepared with.
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.get_vocab() == load_prepared(prepared_dir).tokenizer().get_vocab()
    assert len(tokenizer) == model.config.vocab_size
    # The checkpoint gives the same logits after a save/load round trip.
    ids = torch.randint(5, model.config.vocab_size, (2, 32))
    again = BertForMaskedLM.from_pretrained(final).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_bottom_is_bitwise_unchanged_by_a_stage(prepared_dir, tmp_path):
    args = small_run(prepared_dir, tmp_path / "run")
    run_all(args)
    before, after = (
        params(RunLayout.of(args).stage_dir(1) / "model"),
        params(RunLayout.of(args).stage_dir(2) / "model"),
    )
    bottom = [k for k in before if "embeddings" in k or ".layer.0." in k or ".layer.1." in k]
    assert bottom
    for k in bottom:
        assert torch.equal(before[k], after[k]), k
    # The top did train.
    assert not torch.equal(before["cls.predictions.bias"], after["cls.predictions.bias"])


def test_frozen_parameters_never_reach_the_optimizer(prepared_dir, tmp_path, monkeypatch):
    seen = {}
    original = trainer.train_phase

    def spy(accelerator, phase, *rest):
        frozen = {
            id(p)
            for m in trainer.frozen_modules(phase.model, phase.frozen_layers)
            for p in m.parameters()
        }
        real_adamw = torch.optim.AdamW

        def adamw(groups, **kw):
            ids = {id(p) for g in groups for p in g["params"]}
            seen[phase.name] = (len(ids & frozen), len(ids))
            return real_adamw(groups, **kw)

        monkeypatch.setattr(trainer.torch.optim, "AdamW", adamw)
        try:
            return original(accelerator, phase, *rest)
        finally:
            monkeypatch.setattr(trainer.torch.optim, "AdamW", real_adamw)

    monkeypatch.setattr("cached_mslt.stages.runner.train_phase", spy)
    run_all(small_run(prepared_dir, tmp_path / "run"))
    assert seen["stage-2"][0] == 0 and seen["stage-2"][1] > 0


def test_cached_stage_trains_exactly_like_live_stage(prepared_dir, tmp_path):
    live = small_run(prepared_dir, tmp_path / "live", cache="never")
    run_all(live)
    cached_dir = tmp_path / "cached"
    cached_dir.mkdir()
    shutil.copytree(RunLayout.of(live).stage_dir(1), cached_dir / "stage-1")
    shutil.copy(tmp_path / "live" / "config.json", cached_dir / "config.json")
    cached = small_run(prepared_dir, cached_dir, cache="always")
    manifest = run_stage(cached, 2)
    assert manifest["mode"] == "cached"
    assert_same_params(
        params(RunLayout.of(live).stage_dir(2) / "model"),
        params(RunLayout.of(cached).stage_dir(2) / "model"),
    )


def test_incremental_rebuild_equals_full_rebuild(prepared_dir, tmp_path):
    common = dict(stage_layers="2,3,4", stage_steps="2", cache_dtype="float32")
    inc = small_run(prepared_dir, tmp_path / "inc", cache_rebuild="incremental", **common)
    run_all(inc)
    full_dir = tmp_path / "full"
    shutil.copytree(tmp_path / "inc", full_dir, ignore=shutil.ignore_patterns("stage-3", "cache"))
    full = small_run(prepared_dir, full_dir, cache_rebuild="full", **common)
    (full_dir / "cache").mkdir()
    shutil.copytree(tmp_path / "inc" / "cache" / "stage-2", full_dir / "cache" / "stage-2")
    run_stage(full, 3)
    m_inc = json.loads((RunLayout.of(inc).stage_dir(3) / "manifest.json").read_text())
    m_full = json.loads((RunLayout.of(full).stage_dir(3) / "manifest.json").read_text())
    assert m_inc["cache"]["how"].startswith("incremental") and m_full["cache"]["how"] == "full"
    a = zarr.open_group(str(tmp_path / "inc" / "cache" / "stage-3"), mode="r")
    b = zarr.open_group(str(full_dir / "cache" / "stage-3"), mode="r")
    for name in ("hidden", "attention_mask", "labels", "row_index"):
        assert np.array_equal(a[name][:], b[name][:]), name
        assert a[name][:].tobytes() == b[name][:].tobytes(), name


class Crash(RuntimeError):
    pass


def test_stage_killed_mid_training_resumes_to_the_same_parameters(
    prepared_dir, tmp_path, monkeypatch
):
    straight = small_run(prepared_dir, tmp_path / "straight", stage_steps="7")
    run_all(straight)

    resumed = small_run(prepared_dir, tmp_path / "resumed", stage_steps="7")
    run_stage(resumed, 1)
    real_log = trainer.MetricsWriter.log

    def crash_after_checkpoint(self, record):
        real_log(self, record)
        if (
            record.get("stage") == "stage-2" and record["step"] >= 7 + 5
        ):  # past the step-4 checkpoint
            raise Crash("simulated crash")

    monkeypatch.setattr(trainer.MetricsWriter, "log", crash_after_checkpoint)
    with pytest.raises(Crash):
        run_stage(resumed, 2)
    assert (RunLayout.of(resumed).checkpoint_dir(2) / checkpointing.PROGRESS_FILE).exists()
    assert not (RunLayout.of(resumed).stage_dir(2) / "manifest.json").exists()
    monkeypatch.setattr(trainer.MetricsWriter, "log", real_log)
    run_stage(resumed, 2)
    assert_same_params(
        params(RunLayout.of(straight).stage_dir(2) / "model"),
        params(RunLayout.of(resumed).stage_dir(2) / "model"),
    )
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed")]
    assert steps == sorted(set(steps)), "a resumed stage must not log a step twice"


def test_missing_previous_stage_is_refused(prepared_dir, tmp_path):
    with pytest.raises(StageError, match="needs stage 1"):
        run_stage(small_run(prepared_dir, tmp_path / "run"), 2)


def test_done_stage_is_not_run_again(prepared_dir, tmp_path):
    args = small_run(prepared_dir, tmp_path / "run", stage_steps="2")
    first = run_stage(args, 1)
    assert run_stage(args, 1) == first


def test_mismatched_config_between_stages_is_refused(prepared_dir, tmp_path):
    run_stage(small_run(prepared_dir, tmp_path / "run", stage_steps="2"), 1)
    other = small_run(prepared_dir, tmp_path / "run", stage_steps="2", hidden_size=64)
    with pytest.raises(StageError, match="hidden_size"):
        run_stage(other, 2)


def test_stale_store_is_refused_unless_asked_to_rebuild(prepared_dir, tmp_path):
    args = small_run(prepared_dir, tmp_path / "run", stage_steps="2")
    run_all(args)
    # Pretend stage 1 trained differently: its successor's store no longer matches.
    shutil.rmtree(RunLayout.of(args).stage_dir(2))
    model = BertForMaskedLM.from_pretrained(RunLayout.of(args).stage_dir(1) / "model")
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.bias.add_(1.0)
    replace_stage_model(tmp_path / "run", 1, model)
    with pytest.raises(StaleStoreError, match="weights"):
        run_stage(args, 2)
    rebuilt = small_run(prepared_dir, tmp_path / "run", stage_steps="2", overwrite_cache=True)
    assert run_stage(rebuilt, 2)["mode"] == "cached"


def test_bad_stage_plan_is_refused():
    from cached_mslt.config import run_args
    from cached_mslt.stages.plan import StagePlan

    with pytest.raises(ConfigError, match="strictly increasing"):
        StagePlan.from_args(run_args("tiny", stage_layers="3,3,12"))
    with pytest.raises(ConfigError, match="num_layers"):
        StagePlan.from_args(run_args("tiny", stage_layers="3,6"))


def test_mixed_precision_bf16_stage_runs(prepared_dir, tmp_path):
    from accelerate.state import AcceleratorState

    # The accelerator state is a process-wide singleton that earlier tests created without
    # mixed precision; a real run starts with a fresh process.
    AcceleratorState._reset_state(reset_partial_state=True)
    args = small_run(prepared_dir, tmp_path / "run", stage_steps="2", mixed_precision="bf16")
    try:
        manifests = run_all(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert all(m["train"]["val_loss"] < 20 for m in manifests)
    model = BertForMaskedLM.from_pretrained(RunLayout.of(args).stage_dir(2) / "model")
    assert model.dtype == torch.float32  # autocast computes in bf16; weights stay float32


@pytest.mark.slow  # compiling takes minutes on 2 shared cores
def test_compiled_stages_train_like_eager_ones_within_tolerance(prepared_dir, tmp_path):
    eager = small_run(prepared_dir, tmp_path / "eager", stage_steps="4")
    compiled = small_run(prepared_dir, tmp_path / "compiled", stage_steps="4", compile=True)
    run_all(eager)
    run_all(compiled)
    a = params(RunLayout.of(eager).stage_dir(2) / "model")
    b = params(RunLayout.of(compiled).stage_dir(2) / "model")
    # Compiled kernels sum in another order and the padded gather adds rows to the weight
    # gradients' matmuls: last-bit differences, which 8 AdamW steps keep small.
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
