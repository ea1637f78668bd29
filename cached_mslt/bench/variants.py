"""The trainer's own step, measured: float32 against bf16 autocast and `torch.compile`,
and a real stage's training rate against the benchmark step of the same shape.

Both time the step `cached_mslt/training/trainer.py` takes (`bench.trainer_step`: host-side
gather targets, fused AdamW, gradient clipping); the stage figure also a whole phase
through `train_phase` (store on disk, loader, logging). Ratios come from one run,
interleaved (docs/benchmarks.md). Run: `python pipelines/bench.py --variants precision
stage` (docs/levers.md, precision and compile).
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from cached_mslt.bench.interleave import interleaved_rounds
from cached_mslt.bench.steps import (
    _batch,
    _FakePrepared,
    bench_model,
    cached_case,
    run_shape,
    trainer_step,
)
from cached_mslt.config import run_args
from cached_mslt.models import clone_model
from cached_mslt.stages import CacheRequest, block_rows_for, build_cache
from cached_mslt.training import MetricsWriter, Phase, RunClock, train_phase
from storage import BlockDataset

VARIANTS = {"fp32": (False, False), "bf16": (True, False), "compiled": (False, True)}


def precision_benchmarks(
    preset: str,
    *,
    repeats: int = 5,
    frozen: int = 9,
    variants: tuple[str, ...] = tuple(VARIANTS),
    device: str = "cpu",
) -> list[dict]:
    """Tokens/s of the trainer's cached step in float32 and each of `variants` (bf16
    autocast, compiled), their ratios to float32, compile time, and how far 5 steps of
    each drift from float32, with the model on `device` (`cuda`: what `make gpu-check`
    runs)."""
    torch.set_flush_denormal(True)
    base, data, hidden16 = cached_case(preset, frozen, 32, device=device)
    drift, steps, compile_s = {}, {}, None
    for name in dict.fromkeys(("fp32", *variants)):
        bf16, compiled = VARIANTS[name]
        model = clone_model(base)
        started = time.perf_counter()
        step = trainer_step(
            model,
            frozen,
            # bf16: the 16-bit activations go in as they are, as the trainer hands them over
            lambda bf16=bf16: {**data, "hidden_states": hidden16 if bf16 else hidden16.float()},
            bf16=bf16,
            compiled=compiled,
            mask_prob=run_shape(preset)[1],
        )
        drift[name] = [float(step()) for _ in range(5)]  # same start, same batch, 5 steps
        if compiled:
            compile_s = time.perf_counter() - started
        steps[name] = step
    others = [k for k in steps if k != "fp32"]
    rounds = interleaved_rounds(steps, [("fp32", k) for k in others], window=repeats)
    tag = {"preset": preset, "frozen": frozen, "trained": 12 - frozen, "batch_tokens": 32 * 128}
    tag["device"] = torch.device(device).type
    out = [
        {"name": f"trainer_step_{k}_tokens_per_s", "unit": "tokens/s", **tag}
        | {"value": 4096 / rounds.median_s(k)}
        for k in steps
    ]
    for k in others:
        gap = max(abs(a - b) for a, b in zip(drift[k], drift["fp32"]))
        out.append(
            {"name": f"{k}_vs_fp32_step", "unit": "x", **tag, **rounds.ratio("fp32", k)}
            | {"max_loss_diff_5_steps": gap, "losses": drift[k], "fp32_losses": drift["fp32"]}
        )
    if compile_s is not None:
        out.append({"name": "compile_s", "value": compile_s, "unit": "s", **tag})
    return out


def _store_phase(
    accelerator, preset: str, rows: int, frozen: int, batch_rows: int, tmp: str
) -> Callable[[int], dict]:
    """A cached phase as a run trains it: a float16 store on disk (built by every process),
    the trainer's loader, logging and sync cadence, DDP over the launched processes, at the
    preset's run shape (12 layers, `frozen` frozen, `batch_rows` x 128 per process)."""
    model = bench_model(preset)
    data = _FakePrepared(_batch(preset, rows, 128))
    request = CacheRequest(
        url=f"{tmp}/store", frozen_layers=frozen, dtype="float16", codec="none",
        rows_per_chunk=block_rows_for(batch_rows), data_fingerprint="bench", mask_seed=0,
        seq_len=128, num_rows=rows, stage=4,
    )  # fmt: skip
    with contextlib.redirect_stdout(sys.stderr):
        store, _ = build_cache(model, request, data)
    valid = _FakePrepared(_batch(preset, batch_rows, 128, seed=1))

    def run(steps: int) -> dict:
        args = run_args(
            preset, batch_size=batch_rows, seq_len=128, prepared_dir=tmp, run_dir=tmp,
            eval_every=10**6, eval_batches=1, checkpoint_every=10**6,
        )  # fmt: skip
        phase = Phase(
            name="stage-4", model=model, frozen_layers=frozen, steps=steps,
            blocks=BlockDataset(store, block_rows=block_rows_for(batch_rows)), cached=True,
            learning_rate=1e-4, warmup_fraction=0.0,
        )  # fmt: skip
        metrics = MetricsWriter(tmp, accelerator)
        return train_phase(accelerator, phase, args, RunClock(), metrics, valid)

    return run


def _bench_step(preset: str, frozen: int, batch_rows: int, wrap=None) -> Callable[[int], float]:
    """The bench's cached step at the same shape, fed from RAM (`wrap`: in DDP across the
    launched processes, else on this process alone): `rate(steps)` takes that many steps
    and returns their tokens/s per process."""
    model, data, hidden16 = cached_case(preset, frozen, batch_rows)
    top_input = {"labels": data["labels"], "attention_mask": data["attention_mask"]}
    step = trainer_step(
        model, frozen, lambda: {**top_input, "hidden_states": hidden16.float()}, wrap=wrap
    )
    step()  # first-call allocations

    def rate(steps: int) -> float:
        began = time.perf_counter()
        for _ in range(steps):
            step()
        return steps * batch_rows * 128 / (time.perf_counter() - began)

    return rate


def stage_vs_bench(
    preset: str, *, steps: int = 30, rounds: int = 3, frozen: int = 9, batch_rows: int = 32
) -> list[dict]:
    """A real phase's training tokens/s per process (its stats, evaluation and checkpoints
    off) against the bench's cached step of the same shape, in turns. Launched on several
    processes (`accelerate launch`), both run DDP across them, so the ratio shows what the
    run's loop adds; the same step on each process alone gives what DDP costs
    (`ddp_vs_solo_bench_step`; docs/benchmarks.md, stage against bench)."""
    torch.set_flush_denormal(True)
    accelerator = Accelerator(cpu=True)
    world = accelerator.num_processes
    tmp = [tempfile.mkdtemp(prefix="bench-stage-") if accelerator.is_main_process else None]
    broadcast_object_list(tmp)  # one store for every process
    try:
        phase = _store_phase(
            accelerator, preset, batch_rows * steps * world, frozen, batch_rows, tmp[0]
        )
        benches = {"ddp": _bench_step(preset, frozen, batch_rows, accelerator.prepare_model)}
        if world > 1:
            benches["solo"] = _bench_step(preset, frozen, batch_rows)
        phase(3)  # warm up the loader and the allocator
        stage, bench = [], {k: [] for k in benches}
        for _ in range(rounds):
            stage.append(phase(steps)["tokens_per_s"] / world)
            for kind, rate in benches.items():
                bench[kind].append(rate(steps))
    finally:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(tmp[0], ignore_errors=True)
    stage_rate = statistics.median(stage)
    bench_rate = {k: statistics.median(v) for k, v in bench.items()}
    tag = {
        "preset": preset, "frozen": frozen, "batch_rows": batch_rows, "processes": world,
        "threads": torch.get_num_threads(), "steps": steps, "rounds": rounds,
    }  # fmt: skip
    figures = [
        {"name": "stage_tokens_per_s_per_process", "value": stage_rate, "unit": "tokens/s"}
        | {"all": stage, **tag},
        {"name": "bench_cached_step_tokens_per_s", "value": bench_rate["ddp"], "unit": "tokens/s"}
        | {"all": bench["ddp"], **tag},
        {"name": "stage_vs_bench_step", "value": stage_rate / bench_rate["ddp"], "unit": "x"} | tag,
    ]
    if "solo" in bench:  # what data parallelism costs a step at this shape
        figures.append(
            {"name": "ddp_vs_solo_bench_step", "unit": "x", "all": bench["solo"], **tag}
            | {"value": bench_rate["ddp"] / bench_rate["solo"]}
        )
    return figures
