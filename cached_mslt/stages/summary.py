"""The end-of-run report: one row per stage (times, speed and MFU, loss against the unigram
loss), the loss plot, and the MFU reference the run measures once (`peak.json`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from accelerate import Accelerator, PartialState

from cached_mslt.config import RunArgs
from cached_mslt.data import prepared_manifest
from cached_mslt.models import bert_config
from cached_mslt.rundir import RunLayout, write_atomic
from cached_mslt.stages.plan import StagePlan
from cached_mslt.training import (
    below_unigram,
    markdown_table,
    plot_curves,
    read_metrics,
    run_peak,
    stage_speeds,
)

logger = logging.getLogger(__name__)


def record_peak(args: RunArgs, accelerator: Accelerator) -> None:
    """Write the run's MFU reference (cached_mslt.training.flops.run_peak) beside config.json, once:
    a resumed run keeps the first measurement. On a CPU it is measured now, at the run's
    FFN shape and a large square, before training loads the machine."""
    layout = RunLayout.of(args)
    if accelerator.is_main_process and not layout.peak.exists():
        config = bert_config(args.model, vocab_size=2, num_layers=1)  # only H and I matter
        tokens = args.train.batch_size * args.data.seq_len
        half = accelerator.mixed_precision in ("bf16", "fp16")
        peak = run_peak(
            config, tokens, accelerator.device, half=half, peak_tflops=args.train.peak_tflops
        )
        layout.root.mkdir(parents=True, exist_ok=True)
        write_atomic(layout.peak, json.dumps(peak, indent=2))
    accelerator.wait_for_everyone()


def summary_rows(
    manifests: list[dict[str, Any]], metrics: list[dict[str, Any]], peak: dict, unigram
) -> list[dict[str, Any]]:
    """One row per stage: what it was, its times, its training speed (tokens/s and MFU
    between its first and last log lines, cached_mslt.training.metrics.stage_speeds) and loss."""
    devices = manifests[-1].get("num_processes", 1) if manifests else 1
    speeds = stage_speeds(metrics, peak.get("peak_flops_per_s"), devices)
    rows = []
    for m in manifests:
        speed = speeds.get(m["stage"]["name"], {})
        mfu = speed.get("mfu")
        rows.append(
            {
                "stage": m["stage"]["name"],
                "layers": m["stage"]["num_layers"],
                "frozen": m["stage"]["frozen_layers"],
                "mode": m["mode"],
                "precision": m.get("mixed_precision", "no"),
                "cache build s": m["timings"]["build_s"],
                "train s": m["timings"]["train_s"],
                "tokens/s": speed.get("tokens_per_s", m["train"]["tokens_per_s"]),
                "MFU %": None if mfu is None else 100.0 * mfu,
                "val loss": m["train"]["val_loss"],
                "below unigram %": below_unigram(m["train"]["val_loss"], unigram),
            }
        )
    return rows


def _mfu_note(peak: dict[str, Any]) -> str:
    """What the summary's speed columns mean and which peak MFU divides by."""
    if not peak:
        return ""
    if not peak.get("peak_flops_per_s"):
        return f"MFU: no peak known ({peak['peak_source']}).\n"
    return (
        "tokens/s and MFU: training between a stage's first and last log lines (validation "
        f"excluded); MFU = counted model FLOP/s / {peak['peak_flops_per_s'] / 1e9:,.1f} GFLOP/s "
        f"per device ({peak['peak_source']}, `peak.json`).\n"
    )


def write_summary(args: RunArgs, manifests: list[dict[str, Any]], final_model: Path) -> str:
    unigram = (prepared_manifest(args.data.prepared_dir) or {}).get("unigram_loss")
    layout = RunLayout.of(args)
    peak = json.loads(layout.peak.read_text()) if layout.peak.is_file() else {}
    metrics = read_metrics(layout.root)
    rows = summary_rows(manifests, metrics, peak, unigram)
    table = markdown_table(rows, list(rows[0]))
    plot_curves(
        {"mslt": metrics},
        "wall_s",
        layout.loss_plot,
        f"{args.model.preset}: validation loss",
        "wall-clock seconds (cache builds included)",
        unigram=unigram,
    )
    total = manifests[-1]["clock"]
    final = manifests[-1]["train"]["val_loss"]
    reference = (
        f"Unigram loss of the validation targets (token frequencies alone): {unigram:.3f}; the "
        f"final model is {below_unigram(final, unigram):.1f}% below it.\n"
        if unigram is not None and final is not None
        else ""
    )
    text = (
        f"# Run summary: {layout.root}\n\n{table}\n\n{_mfu_note(peak)}{reference}"
        f"Total: {total['step']:,} steps, {total['tokens']:,} tokens, {total['wall_s']:.0f} s "
        f"wall-clock ({total.get('cpu_s', 0):.0f} s CPU), cache builds included, validation "
        "excluded.\n"
        f"Final model: `{final_model}` (AutoModelForMaskedLM and AutoTokenizer load it). "
        "Plot: `val_loss.png`.\n"
    )
    layout.summary.write_text(text)
    return text


def finished_manifests(args: RunArgs) -> list[dict[str, Any]]:
    """The manifests of the plan's stages finished so far, in order (up to the first gap)."""
    layout = RunLayout.of(args)
    manifests = []
    for stage in StagePlan.from_args(args).stages:
        manifest = layout.read_manifest(stage.index)
        if manifest is None:
            break
        manifests.append(manifest)
    return manifests


def write_run_summary(args: RunArgs) -> str | None:
    """summary.md and val_loss.png of the stages finished so far, on the main process: after
    every stage, whether all stages run in one call (run_all) or one at a time
    (pipelines/stage.py). None if no stage has finished or on the other processes."""
    manifests = finished_manifests(args)
    if not manifests or not PartialState().is_main_process:
        return None
    final = RunLayout.of(args).model_dir(manifests[-1]["stage"]["index"])
    return write_summary(args, manifests, final)
