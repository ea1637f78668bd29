"""The planner's arithmetic (docs/scaling.md, "Planning a run"): the cost model's counts on
known shapes, seconds at given rates, and the choice `--cache auto` makes with them."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cached_mslt.config import ConfigError, PlanArgs, run_args
from cached_mslt.stages.cache_choice import choose_cache
from cached_mslt.stages.cost_model import ModelShape, Rates, Stored, stage_seconds
from cached_mslt.stages.plan import Stage, StagePlan
from cached_mslt.stages.planner import make_plan, model_shape, plan_rates

BERT_BASE = ModelShape(
    hidden_size=768, intermediate_size=3072, vocab_size=30522, seq_len=128, mask_prob=0.15
)
# One frozen layer over one row of bert-base: 128 tokens x (2 (4 H^2 + 2 H I) + 4 T H).
LAYER_ROW = 128 * (2 * (4 * 768**2 + 2 * 768 * 3072) + 4 * 128 * 768)


def test_bert_base_row_costs_what_docs_scaling_says():
    assert BERT_BASE.layer_row_flops == LAYER_ROW
    assert BERT_BASE.row_bytes == 197_256  # docs/scaling.md, "Sizing"
    # the trained top of 3 layers with its head, frozen decoder weight: forward 1x, backward 2x
    head = 0.15 * 128 * (3 * 2 * 768**2 + 2 * 2 * 768 * 30522)
    assert BERT_BASE.train_row_flops(3, False) == pytest.approx(3 * 3 * LAYER_ROW + head)


def stage(index: int, plan="3,6,9,12"):
    return StagePlan.from_args(run_args("bert-base", stage_layers=plan, cache="auto"))[index]


def test_live_stage_pays_its_frozen_layers_on_every_read():
    rates = Rates(train_flops_per_s=1e14, forward_flops_per_s=2e14, processes=4)
    cost = stage_seconds("live", stage(3), BERT_BASE, rates, rows=1000, reads=3000, stored=[])
    train = 3000 * BERT_BASE.train_row_flops(3, False) / 1e14
    frozen = 3000 * 6 * LAYER_ROW / 2e14
    assert cost.layer_rows == 3000 * 6
    assert cost.train_s == pytest.approx((train + frozen) / 4)
    assert cost.bytes_read == cost.bytes_written == cost.build_s == 0


def test_eager_build_then_every_read_from_the_store():
    rates = Rates(1e14, 2e14, read_bytes_per_s=1e9, write_bytes_per_s=5e8, overlap=False)
    stored = [Stored(3, 1.0)]  # a complete store of stage 2: the build runs layers 3..6 only
    cost = stage_seconds("eager", stage(3), BERT_BASE, rates, 1000, 3000, stored)
    rb = BERT_BASE.row_bytes
    assert cost.layer_rows == 1000 * 3
    assert cost.build_s == pytest.approx(
        3000 * LAYER_ROW / 2e14 + 1000 * rb / 5e8 + 1000 * rb / 1e9
    )
    assert cost.io_s == pytest.approx(3000 * rb / 1e9)
    assert cost.bytes_written == 1000 * rb and cost.bytes_read == 4000 * rb
    overlapped = stage_seconds(
        "eager", stage(3), BERT_BASE, Rates(1e14, 2e14, 1e9, 5e8), 1000, 3000, stored
    )
    assert overlapped.train_s == pytest.approx(max(overlapped.compute_s, overlapped.io_s))


def test_write_through_computes_each_row_once_and_reads_the_repeats():
    rates = Rates(1e14, 2e14, read_bytes_per_s=1e9, write_bytes_per_s=5e8, overlap=False)
    cost = stage_seconds("write-through", stage(2), BERT_BASE, rates, 1000, 2500, [])
    rb = BERT_BASE.row_bytes
    assert cost.layer_rows == 1000 * 3
    assert cost.bytes_written == 1000 * rb and cost.bytes_read == 1500 * rb
    assert cost.io_s == pytest.approx(1000 * rb / 5e8 + 1500 * rb / 1e9)
    assert cost.build_s == 0


def test_a_slow_store_makes_the_step_io_bound_and_auto_choose_live():
    plan = StagePlan.from_args(run_args("bert-base", stage_layers="3,6,9,12", cache="auto"))
    last, rows = plan[4], 1000
    fast = (BERT_BASE, Rates(1e14, 1e14, read_bytes_per_s=1e12, write_bytes_per_s=1e12))
    slow = (BERT_BASE, Rates(1e14, 1e14, read_bytes_per_s=1e7, write_bytes_per_s=1e7))
    # reading every row twice: write-through saves half the frozen forwards ...
    assert choose_cache(plan, last, rows, lambda s: 2000, [], fast)[0] == "write-through"
    # ... which a store at 10 MB/s costs back many times over
    assert choose_cache(plan, last, rows, lambda s: 2000, [], slow)[0] == "live"
    cost = stage_seconds("eager", last, *slow, rows, 2000, [])
    assert cost.bound == "I/O"
    # without rates the choice is the layer-row count's, as before rates existed
    assert choose_cache(plan, last, rows, lambda s: 2000, [])[0] == "write-through"


def test_planned_run_on_a_known_gpu():
    args = run_args("bert-base", stage_tokens="1.28e9", views=10)
    plan = PlanArgs(corpus_tokens=1.28e8, gpu="A100", gpus=8, mfu=0.25)
    report = make_plan(args, plan)
    assert report["corpus_rows"] == 10_000_000  # 1.28e8 tokens x 10 views / 128
    assert plan_rates(plan).train_flops_per_s == 312e12 * 0.25  # flops.py's A100 bf16 peak
    rows = 4 * 1.28e9 / 128
    full = rows * model_shape(args).train_row_flops(12, True) / (312e12 * 0.25) / 8
    assert report["totals"]["full_model_s"] == pytest.approx(full)
    assert [s["epochs"] for s in report["stages"]] == [1.0] * 4
    assert report["stages"][0]["choice"] == "live"  # stage 1 has nothing frozen
    assert math.isclose(
        sum(s["wall_s"] for s in report["stages"]), report["totals"]["cached_mslt_s"]
    )


def test_plan_refuses_a_gpu_it_has_no_peak_for():
    with pytest.raises(ConfigError, match="peak_tflops"):
        plan_rates(PlanArgs(gpu="Imaginary 9000"))


# slow (`make test-slow`): 6-9 s; the default suite took 10.7 minutes on a fresh clone (2026-12-03)
@pytest.mark.slow
def test_plan_command_prints_the_table(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "pipelines/plan.py",
            "--preset",
            "bert-base",
            "--corpus_tokens",
            "1e8",
            "--stage_tokens",
            "1e8",
            "--gpu",
            "H100",
            "--gpus",
            "8",
            "--read_gbps",
            "2",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "| stage-4 | 9+3 |" in out.stdout and "live MSLT" in out.stdout


def test_manifest_records_the_measured_rate_and_predicted_against_actual(prepared_dir, tmp_path):
    from cached_mslt.rundir import RunLayout
    from cached_mslt.stages import run_stage
    from tests.conftest import small_run

    args = small_run(prepared_dir, tmp_path, cache="write-through", stage_layers="1,2,4")
    first, second, third = (run_stage(args, k) for k in (1, 2, 3))
    assert first["cost_model"]["measured"]["train_flops_per_s"] > 0
    assert "predicted" not in first["cost_model"]  # nothing measured before stage 1
    record = second["cost_model"]
    # Stage 2 is priced at a probe of its own step and frozen forward, not at stage 1's
    # rate (a stage that trains the embeddings runs at another one); stage 3 at stage 2's.
    assert record["predicted"]["rates_from"] == "a probe of this stage's top and bottom"
    rates = record["predicted"]["rates"]
    assert rates["train_flops_per_s"] > 0 and rates["forward_flops_per_s"] > 0
    assert rates["train_flops_per_s"] != first["cost_model"]["measured"]["train_flops_per_s"]
    later = third["cost_model"]["predicted"]
    assert later["rates_from"] == "the previous stage"
    assert later["rates"]["train_flops_per_s"] == record["measured"]["train_flops_per_s"]
    assert record["predicted"]["mode"] == "write-through"
    assert record["predicted_vs_actual_wall"] == pytest.approx(
        record["predicted"]["wall_s"] / record["actual"]["wall_s"]
    )
    assert "s at the measured rates" in second["cache_decision"]
    assert RunLayout.of(args).read_manifest(2)["cost_model"] == record
    # the store's bandwidth, probed before the choice, priced it, and the probe is gone
    probed = record["measured"]["store_bandwidth"]
    assert probed["read_bytes_per_s"] > 0 and probed["write_bytes_per_s"] > 0
    for way in ("read_bytes_per_s", "write_bytes_per_s"):
        assert record["predicted"]["rates"][way] == probed[way]
    assert first["cost_model"]["measured"]["store_bandwidth"] is None  # stage 1 stores nothing
    assert not Path(RunLayout.of(args).probe_url()).exists()


def test_a_slow_store_prices_write_through_above_live():
    # the same stage and rows; only the store's bandwidth differs
    shape = ModelShape(128, 512, 8192, 128, 0.4)
    stage = Stage(index=2, num_layers=6, frozen_layers=3, tokens=None, steps=100, cache="auto")
    args = (stage, shape)
    fast = Rates(1e9, 1e9, read_bytes_per_s=1e10, write_bytes_per_s=1e10, overlap=False)
    slow = Rates(1e9, 1e9, read_bytes_per_s=1e5, write_bytes_per_s=1e5, overlap=False)
    cost = {
        (name, mode): stage_seconds(mode, *args, rates, 800, 800, [Stored(3, 0.0)]).wall_s
        for name, rates in (("fast", fast), ("slow", slow))
        for mode in ("live", "write-through")
    }
    assert cost["fast", "write-through"] <= cost["fast", "live"] * 1.01
    assert cost["slow", "write-through"] > 1.2 * cost["slow", "live"]


def test_the_rate_probe_leaves_the_model_and_the_random_state_as_they_were(tmp_path):
    """Stage 2 times its own top before choosing a mode (`probe_compute`): the stage must
    then train exactly as without it, so no weight, gradient or random draw may change."""
    from accelerate import Accelerator

    from cached_mslt.config import run_args
    from cached_mslt.models import build_model
    from cached_mslt.stages.measured import probe_compute

    args = run_args(
        "tiny",
        num_layers=4,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        dropout=0.1,
    )  # dropout draws random numbers
    model = build_model(args.model, 128, 4, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    labels = torch.where(torch.rand(4, 16, generator=g) < 0.3, 5, -100)
    batch = {
        "input_ids": torch.randint(0, 128, (4, 16), generator=g),
        "attention_mask": torch.ones(4, 16, dtype=torch.long),
        "labels": labels,
    }
    torch.manual_seed(1)
    rng = torch.get_rng_state()
    rates = probe_compute(model, 2, batch, Accelerator(cpu=True), repeats=2)
    assert rates["train_flops_per_s"] > 0 and rates["forward_flops_per_s"] > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_several_processes_keep_the_previous_stages_rate_which_includes_the_all_reduce():
    from cached_mslt.stages.measured import previous_rate

    stage_one = {
        "stage": {"frozen_layers": 0},
        "cost_model": {"measured": {"train_flops_per_s": 5.0}},
    }
    assert previous_rate(stage_one, processes=1) is None  # one process: stage 2 probes itself
    assert previous_rate(stage_one, processes=2) == {
        "train_flops_per_s": 5.0,
        "forward_flops_per_s": 5.0,
    }
