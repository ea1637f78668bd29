"""`--cache auto` at run time: the cost model fed with the rates the run measured so far,
and the manifest's record of predicted against actual (docs/scaling.md, "Planning a run").

Each finished stage records in its manifest's `cost_model` the FLOP/s its training steps
reached per process (the clock's counted FLOPs over its training wall seconds) and, for
the mode it ran in, the seconds the cost model predicted beside the seconds it took. The
next stage prices its modes at that rate (a frozen forward at the same rate), unless that
stage had no frozen bottom and the run is one process: stage 2 then times a few passes of
its own top and frozen bottom on one batch instead (`probe_compute`). It prices its store
I/O at the bandwidth a probe of the stage's store location measured just before
(`storage/bandwidth.py`: one unit-sized write at a time, one batch of reads at once, on
every process; the slowest process's rates, since a step waits for it). On one CPU
thread I/O adds to compute; on a GPU the loader and the writer overlap it
(`Rates.overlap`). The planner (`pipelines/plan.py`) prices I/O the same way from given
or `--measure`d bandwidths.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import BertForMaskedLM

from cached_mslt.config import RunArgs
from cached_mslt.models import IGNORE_INDEX, TopModel, bottom_forward, freeze_bottom
from cached_mslt.stages.cost_model import ModelShape, Rates, Stored, stage_seconds
from cached_mslt.stages.plan import Stage
from cached_mslt.stages.planner import model_shape
from cached_mslt.training import layer_forward_flops, step_flops
from storage import probe_bandwidth

logger = logging.getLogger(__name__)


def previous_rate(previous: dict[str, Any] | None, processes: int = 1) -> dict[str, float] | None:
    """The training FLOP/s the previous stage measured, as the rate of both a training step
    and a frozen forward. With one process, only if that stage had a frozen bottom too: a
    stage without one (stage 1) trains the embeddings and the tied decoder, whose gradient
    spans the whole vocabulary, and ran 19-40% fewer FLOP/s than the stage after it
    (docs/scaling.md), so `probe_compute` prices the next one. With several processes the
    previous stage's rate is kept whatever it trained: it includes the gradient all-reduce
    and the wait for the slowest rank, which a probe without them misses (two ranks over
    gloo: stage 2 of `make run` took 1.5x what its probe predicted, 1.19x stage 1's)."""
    if not previous or (processes == 1 and not previous["stage"]["frozen_layers"]):
        return None
    rate = ((previous.get("cost_model") or {}).get("measured") or {}).get("train_flops_per_s")
    return {"train_flops_per_s": rate, "forward_flops_per_s": rate} if rate else None


def priced_at(
    args: RunArgs,
    compute: dict[str, float] | None,
    processes: int,
    bandwidth: dict[str, float] | None = None,
    overlap: bool = False,
) -> tuple[ModelShape, Rates] | None:
    """The run's shape and Rates: `compute` FLOP/s (`previous_rate` or `probe_compute`;
    None: nothing to price with) and the store's `bandwidth` (`store_bandwidth`; None: I/O
    counted free)."""
    if not compute:
        return None
    io = {k: bandwidth[k] for k in ("read_bytes_per_s", "write_bytes_per_s")} if bandwidth else {}
    rates = Rates(
        compute["train_flops_per_s"],
        compute["forward_flops_per_s"],
        **io,
        overlap=overlap,
        processes=processes,
    )
    return model_shape(args), rates


def _seconds_per_call(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Wall seconds per call of `fn` after one untimed call (a GPU synchronized around it)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - began) / repeats


def probe_compute(
    model: BertForMaskedLM,
    frozen: int,
    batch: dict[str, torch.Tensor],
    accelerator: Accelerator,
    repeats: int = 3,
) -> dict[str, float]:
    """FLOP/s per process of this stage's own training step (forward and backward of the
    top over `frozen` layers, no optimizer step) and of its frozen forward, timed on one
    real `batch` under the run's precision: the slowest process's rates, since a step
    waits for it. Leaves the model as it was (gradients dropped, on its device) and the
    random state too, so the stage trains exactly as it would without the probe."""
    device = accelerator.device
    model.to(device)
    freeze_bottom(model, frozen)  # what trains in the stage trains here (the trainer redoes it)
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    top, config = TopModel(model, frozen), model.config
    rows, seq_len = ids.shape
    gpu = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpu), accelerator.autocast():

        @torch.no_grad()
        def forward() -> torch.Tensor:
            return bottom_forward(model, ids, mask, frozen)

        hidden = forward()

        def step() -> None:
            top(labels=labels, attention_mask=mask, hidden_states=hidden)[0].backward()

        forward_s = _seconds_per_call(forward, repeats, device)
        step_s = _seconds_per_call(step, repeats, device)
    model.zero_grad(set_to_none=True)
    flops = step_flops(
        config,
        tokens=rows * seq_len,
        masked_tokens=int((labels != IGNORE_INDEX).sum()),
        trained_layers=config.num_hidden_layers - frozen,
        frozen_live_layers=0,
        seq_len=seq_len,
        decoder_weight_trains=False,
    )
    forward_flops = frozen * rows * seq_len * layer_forward_flops(config, seq_len)
    mine = {"train_flops_per_s": flops / step_s, "forward_flops_per_s": forward_flops / forward_s}
    everyone = gather_object([mine])
    return {k: min(r[k] for r in everyone) for k in mine}


def store_bandwidth(
    url: str, unit_bytes: int, accelerator: Accelerator, storage_options: dict[str, Any]
) -> dict[str, float] | None:
    """Every process probes the store location at once; the slowest rates each way. None
    if any probe failed (the stage's own first access then says what is wrong)."""
    try:
        rank = f"rank-{accelerator.process_index}"
        mine = probe_bandwidth(url, unit_bytes, name=rank, storage_options=storage_options)
        found = mine.to_dict()
    except Exception as e:  # whatever failed here, every process must still reach the gather
        logger.warning("store bandwidth not measured (I/O priced as free): %s", e)
        found = None
    everyone = gather_object([found])
    if any(f is None for f in everyone):
        return None
    return {k: min(f[k] for f in everyone) for k in everyone[0]}


def predicted(
    priced: tuple[ModelShape, Rates] | None,
    mode: str,
    stage: Stage,
    rows: int,
    reads: int,
    stored: list[Stored],
    rates_from: str = "",
) -> dict[str, Any] | None:
    """What the cost model expects of `stage` in `mode` at the measured rates (and where
    they were measured)."""
    if priced is None:
        return None
    cost = stage_seconds(mode, stage, *priced, rows, reads, stored)
    return {"rates": priced[1].to_dict(), "rates_from": rates_from, **cost.to_dict()}


def cost_record(
    prediction: dict[str, Any] | None,
    start: dict[str, float],
    before_training: dict[str, float],
    end: dict[str, float],
    stats: dict[str, Any],
    processes: int,
    bandwidth: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The manifest's `cost_model`: this stage's measured rates (training FLOP/s, and the
    store bandwidth its choice was priced at), and predicted vs actual (clock dicts: at
    the stage's start, before its first step, at its end)."""
    train_flops = end["flops"] - before_training["flops"]
    train_s = stats.get("train_s") or 0.0
    rate = train_flops / processes / train_s if train_s > 0 else None
    actual = {"wall_s": end["wall_s"] - start["wall_s"], "cpu_s": end["cpu_s"] - start["cpu_s"]}
    measured = {"train_flops_per_s": rate, "store_bandwidth": bandwidth}
    record: dict[str, Any] = {"measured": measured, "actual": actual}
    if prediction is not None:
        record["predicted"] = prediction
        record["predicted_vs_actual_wall"] = prediction["wall_s"] / actual["wall_s"]
    return record
