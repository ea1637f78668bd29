"""The benchmark's machinery on tiny shapes: which figures it names and how it decides to
stop. Never timings: the bench measures speed, tests only check it measures the right thing."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from cached_mslt.bench.interleave import interleaved_rounds
from cached_mslt.bench.steps import build_benchmark, step_benchmarks
from cached_mslt.bench.variants import precision_benchmarks, stage_vs_bench
from cached_mslt.stages.background import ShardWriter, read_ahead
from cached_mslt.training.flops import gpu_peak, peak_for, run_peak
from cached_mslt.training.metrics import stage_speeds


def test_step_benchmark_names_every_figure_with_mfu_and_spread() -> None:
    figures = step_benchmarks(
        "tiny", frozen=1, layers=2, batch_rows=8, seq_len=16, cap_s=0.0, window=2
    )
    by_name = {f["name"]: f for f in figures}
    for kind in ("cached", "store", "live", "full"):
        step = by_name[f"{kind}_step_tokens_per_s"]
        assert step["min"] <= step["value"] <= step["max"]
        assert step["mfu"] > 0 and step["mfu_vs_ffn_matmul"] > 0
        assert step["peak_source"].startswith("measured")
    for name in ("cached_vs_live_step", "cached_vs_full_step", "store_vs_ram_cached_step"):
        ratio = by_name[name]
        assert ratio["min"] <= ratio["value"] <= ratio["max"] and ratio["rounds"] >= 2
        assert ratio["stopped"] and "model_ratio" in ratio
    assert by_name["store_cached_vs_live_step"]["model_ratio"] > 1
    assert {"matmul_ffn_flops_per_s", "matmul_square_flops_per_s"} <= set(by_name)


def test_build_benchmark_reports_the_ratio_and_the_build_mfu() -> None:
    figures = build_benchmark("tiny", rows=32, seq_len=16, first=1, last=2, plain_rows=16)
    by_name = {f["name"]: f for f in figures}
    ratio = by_name["build_vs_nograd_forward"]
    assert ratio["min"] <= ratio["value"] <= ratio["max"]
    assert by_name["build_rows_per_s"]["mfu"] > 0
    assert by_name["store_loader_rows_per_s"]["value"] > 0


def _clock(durations):
    """Functions that 'take' the given seconds, on a fake clock the rounds read."""
    now = [0.0]

    def make(seq):
        values = iter(seq)

        def fn():
            now[0] += next(values)

        return fn

    return now, {name: make(seq) for name, seq in durations.items()}


def test_rounds_stop_when_every_ratio_is_stable(monkeypatch) -> None:
    now, fns = _clock({"a": itertools.cycle([1.0]), "b": itertools.repeat(2.0)})
    monkeypatch.setattr("cached_mslt.bench.interleave.time.perf_counter", lambda: now[0])
    rounds = interleaved_rounds(fns, [("b", "a")], window=3, cap_s=100.0, warmup=0)
    assert rounds.stopped.startswith("stable") and len(rounds.seconds["a"]) == 3
    assert rounds.ratio("b", "a")["value"] == 2.0


def test_rounds_say_when_the_time_cap_ended_them(monkeypatch) -> None:
    now, fns = _clock({"a": itertools.cycle([1.0, 3.0]), "b": itertools.repeat(2.0)})
    monkeypatch.setattr("cached_mslt.bench.interleave.time.perf_counter", lambda: now[0])
    rounds = interleaved_rounds(fns, [("b", "a")], window=3, cap_s=20.0, warmup=0)
    ratio = rounds.ratio("b", "a")
    assert ratio["stopped"].startswith("time cap") and ratio["rounds"] == len(rounds.seconds["a"])
    assert ratio["min"] < ratio["value"] < ratio["max"]


def test_read_ahead_keeps_order_and_raises_the_producers_error() -> None:
    assert list(read_ahead(range(10), depth=2)) == list(range(10))

    def failing():
        yield 1
        raise OSError("source store gone")

    items = read_ahead(failing())
    assert next(items) == 1
    with pytest.raises(OSError, match="source store gone"):
        next(items)


def test_read_ahead_stops_its_thread_when_the_consumer_stops_early() -> None:
    before = threading.active_count()
    items = read_ahead(itertools.count(), depth=1)
    assert next(items) == 0
    items.close()
    assert threading.active_count() == before


class _Store:
    def __init__(self, fail_on: int | None = None):
        self.written, self.fail_on = [], fail_on

    def write_shard(self, shard, **rows):
        if shard == self.fail_on:
            raise OSError("disk full")
        self.written.append(shard)


def test_shard_writer_writes_in_order_and_reports_a_failed_write() -> None:
    store = _Store()
    writer = ShardWriter(store)
    for shard in range(4):
        writer.put(shard, {"hidden": torch.zeros(1)})
    writer.close()
    assert store.written == [0, 1, 2, 3]
    failing = ShardWriter(_Store(fail_on=1))
    failing.put(0, {})
    failing.put(1, {})
    with pytest.raises(OSError, match="disk full"):
        failing.close()
    assert failing.store.written == [0]


def test_peak_comes_from_the_override_the_gpu_table_or_a_measurement() -> None:
    assert peak_for("cpu", peak_tflops=2.0).flops_per_s == 2e12
    assert gpu_peak("NVIDIA A100-SXM4-80GB", half=True).flops_per_s == 312e12
    assert gpu_peak("NVIDIA A10G", half=False).flops_per_s == 31.2e12  # not the A100's
    assert gpu_peak("NVIDIA L40S", half=True).flops_per_s == 362e12  # not the L4's
    assert gpu_peak("Some Future GPU", half=True) is None
    assert peak_for("cpu").source.startswith("measured")


def test_a_run_on_an_unknown_gpu_records_no_peak_instead_of_failing(monkeypatch) -> None:
    monkeypatch.setattr(
        "cached_mslt.training.flops.torch.cuda.get_device_name", lambda _: "Future GPU"
    )
    config = type("C", (), {"hidden_size": 4, "intermediate_size": 8})()
    peak = run_peak(config, 16, "cuda:0")
    assert peak["peak_flops_per_s"] is None and "--peak_tflops" in peak["peak_source"]


def test_stage_speeds_use_the_span_between_a_stages_log_lines() -> None:
    line = {"train_loss": 1.0}
    records = [
        {**line, "stage": "stage-1", "wall_s": 10.0, "tokens": 100, "flops": 1e9},
        {**line, "stage": "stage-1", "wall_s": 20.0, "tokens": 1100, "flops": 3e9},
        {"stage": "stage-1", "wall_s": 21.0, "val_loss": 5.0},  # no train_loss: not a step line
        {**line, "stage": "stage-2", "wall_s": 50.0, "tokens": 1200, "flops": 9e9},
    ]
    speeds = stage_speeds(records, peak_flops_per_s=1e9, devices=2)
    assert speeds["stage-1"] == {"tokens_per_s": 100.0, "flops_per_s": 2e8, "mfu": 0.1}
    assert speeds["stage-2"]["mfu"] is None  # one line: no span


# slow (`make test-slow`): 6-9 s; the default suite took 10.7 minutes on a fresh clone (2026-12-03)
@pytest.mark.slow
def test_the_trainer_step_in_bf16_is_timed_against_float32_and_computes_the_same_model():
    figures = {f["name"]: f for f in precision_benchmarks("tiny", repeats=1, variants=("bf16",))}
    assert {"trainer_step_fp32_tokens_per_s", "trainer_step_bf16_tokens_per_s"} <= set(figures)
    ratio = figures["bf16_vs_fp32_step"]
    assert ratio["value"] > 0 and ratio["min"] <= ratio["value"] <= ratio["max"]
    assert ratio["max_loss_diff_5_steps"] < 0.05  # bf16 rounding, not another model


def test_a_real_stage_is_timed_against_the_bench_step_of_its_shape():
    figures = {f["name"]: f for f in stage_vs_bench("tiny", steps=2, rounds=1, batch_rows=4)}
    stage = figures["stage_tokens_per_s_per_process"]
    bench = figures["bench_cached_step_tokens_per_s"]
    assert stage["value"] > 0 and bench["value"] > 0
    assert figures["stage_vs_bench_step"]["value"] == stage["value"] / bench["value"]


def test_write_through_steps_are_timed_against_the_cached_and_live_steps():
    from cached_mslt.bench import write_through_benchmarks

    figures = write_through_benchmarks(
        "tiny", frozen=1, layers=2, batch_rows=8, seq_len=16, cap_s=0.0, window=2
    )
    names = {f["name"]: f for f in figures}
    assert set(names) == {
        "write_through_stored_vs_cached_step",
        "write_through_missing_vs_live_step",
    }
    assert all(f["value"] > 0 and f["rounds"] >= 2 for f in figures)


# slow (`make test-slow`): MiniLM-shaped steps, 29 s beside two fine-tuning runs
@pytest.mark.slow
def test_the_classifier_step_is_timed_with_the_first_position_last_layer_and_the_whole_one():
    from cached_mslt.bench import classifier_benchmarks

    figures = classifier_benchmarks(repeats=1)
    speedups = [f for f in figures if f["name"] == "classifier_step_first_position_speedup"]
    assert [f["frozen"] for f in speedups] == [0, 3, 4]
    assert all(f["value"] > 0 and f["min"] <= f["value"] <= f["max"] for f in speedups)
    rates = [f for f in figures if f["unit"] == "tokens/s"]
    assert len(rates) == 6 and all(f["value"] > 0 for f in rates)
