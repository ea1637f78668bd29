"""The learning-rate schedule across stages (docs/levers.md, growth that pays):
with `--lr_scope run` the stages share one warm-up and one decay, each continuing where
the last ended; with `--lr_scope stage` each stage warms up and decays on its own."""

from __future__ import annotations

import pytest
import torch

from cached_mslt.config import ConfigError, run_args
from cached_mslt.stages.runner import run_all
from cached_mslt.training.metrics import read_metrics
from tests.conftest import small_run


def _rates(run_dir) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {}
    for r in read_metrics(run_dir):
        if "lr" in r:
            rates.setdefault(r["stage"], []).append(r["lr"])
    return rates


def test_a_run_wide_schedule_continues_each_stage_from_where_the_last_ended(prepared_dir, tmp_path):
    args = small_run(prepared_dir, tmp_path / "run", lr_scope="run", stage_steps="6,2")
    run_all(args)
    rates = _rates(tmp_path / "run")
    every = rates["stage-1"] + rates["stage-2"]
    # One linear decay over the 8 planned steps (no warm-up), whichever stage a step is
    # in: the rate logged after step k of the run is 1e-3 * (1 - k / 8).
    assert every == pytest.approx([1e-3 * (1 - k / 8) for k in range(1, 9)], rel=1e-9)


# slow (`make test-slow`): 6-9 s; the default suite took 10.7 minutes on a fresh clone (2026-12-03)
@pytest.mark.slow
def test_a_run_wide_wsd_schedule_holds_the_peak_until_the_last_stage_decays(prepared_dir, tmp_path):
    args = small_run(
        prepared_dir,
        tmp_path / "run",
        lr_scope="run",
        lr_schedule="wsd",
        decay_fraction=0.25,
        stage_steps="6,2",
    )
    run_all(args)
    rates = _rates(tmp_path / "run")
    # 8 planned steps, the last quarter decaying: the peak through stage 1, then 5e-4, 0
    assert rates["stage-1"] == pytest.approx([1e-3] * 6, rel=1e-9)
    assert rates["stage-2"] == pytest.approx([5e-4, 0.0], abs=1e-12)
    with pytest.raises(ConfigError, match="decay_fraction"):
        run_args("tiny", lr_schedule="wsd", warmup_fraction=0.5, decay_fraction=0.6)


def test_a_per_stage_schedule_restarts_the_rate_at_every_stage(prepared_dir, tmp_path):
    args = small_run(prepared_dir, tmp_path / "run", lr_scope="stage", stage_steps="6,2")
    run_all(args)
    rates = _rates(tmp_path / "run")
    assert rates["stage-1"] == pytest.approx([1e-3 * (1 - k / 6) for k in range(1, 7)])
    assert rates["stage-2"] == pytest.approx([5e-4, 0.0], abs=1e-12)  # from the peak again


def test_presets_set_the_scope_and_views_and_a_flag_wins():
    tiny = run_args("tiny")
    schedule = tiny.schedule
    assert (schedule.lr_scope, schedule.growth_init, schedule.stage_order) == (
        "run",
        "identity",
        "fresh",
    )
    assert tiny.data.views == 8 and run_args("mini").schedule.stage_order == "same"
    assert run_args("mini").schedule.growth_init == "copy"
    assert run_args("mini").schedule.lr_scope == "stage"
    assert run_args("mini").data.views == 1
    assert run_args("tiny", lr_scope="stage", views=3).schedule.lr_scope == "stage"
    assert run_args("tiny", views=3).data.views == 3
    # issue 29's lever 5: tiny trains on more text; the other presets keep the default corpus
    assert tiny.data.corpus == ["default", "sotu"] and run_args("mini").data.corpus == ["default"]
    assert run_args("tiny", corpus=["notes.txt"]).data.corpus == ["notes.txt"]
    with pytest.raises(ConfigError, match="lr_scope"):
        run_args("tiny", lr_scope="epoch")
    with pytest.raises(ConfigError, match="views"):
        run_args("tiny", views=0)


@pytest.mark.parametrize("order, seeds", [("same", [0, 0]), ("fresh", [0, 1])])
def test_fresh_stages_shuffle_with_their_own_seed(
    prepared_dir, tmp_path, monkeypatch, order, seeds
):
    from cached_mslt.training import trainer

    used, make = [], trainer.make_block_loader

    def spy(*args, **kwargs):
        used.append(kwargs["seed"])
        return make(*args, **kwargs)

    monkeypatch.setattr(trainer, "make_block_loader", spy)
    run_all(small_run(prepared_dir, tmp_path / "run", stage_order=order, stage_steps="2"))
    assert used == seeds


def test_each_stage_trains_with_its_own_dropout_and_its_checkpoint_records_it(
    prepared_dir, tmp_path, monkeypatch
):
    """Lever 3 (`--stage_dropout`): stage K's model drops at its own rate in every dropout
    module while it trains, its manifest and saved config record the rate, and a bad value
    is refused at parse time."""
    from transformers import BertForMaskedLM

    from cached_mslt.rundir import RunLayout
    from cached_mslt.stages import runner

    seen, load = {}, runner.load_stage_model

    def spy(args, stage, vocab_size):
        model = load(args, stage, vocab_size)
        seen[stage.index] = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
        return model

    monkeypatch.setattr(runner, "load_stage_model", spy)
    args = small_run(prepared_dir, tmp_path / "run", stage_dropout="0,0.2", stage_steps="2")
    run_all(args)
    assert seen == {1: {0.0}, 2: {0.2}}
    layout = RunLayout(tmp_path / "run")
    assert [layout.read_manifest(k)["stage"]["dropout"] for k in (1, 2)] == [0.0, 0.2]
    saved = BertForMaskedLM.from_pretrained(layout.model_dir(2)).config
    assert saved.hidden_dropout_prob == saved.attention_probs_dropout_prob == 0.2
    for bad in ("0.1,1.0", "x", "-0.1"):
        with pytest.raises(ConfigError, match="stage_dropout"):
            run_args("tiny", stage_dropout=bad)
    with pytest.raises(ConfigError, match="stage_dropout has 3 values for 2 stages"):
        run_all(small_run(prepared_dir, tmp_path / "other", stage_dropout="0,0.1,0.1"))
