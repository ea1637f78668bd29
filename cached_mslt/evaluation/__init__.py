"""Evaluating a pretrained checkpoint on downstream tasks: fine-tuning over seeds and a
linear probe of the frozen encoder. `evaluate_checkpoint` is what `pipelines/finetune.py`
and the comparison (`--finetune`) both run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import PreTrainedTokenizerBase

from cached_mslt.evaluation.args import FinetuneArgs, FinetuneError
from cached_mslt.evaluation.finetune import RESULTS_FILE, finetune
from cached_mslt.evaluation.frozen_top import ClassifierTop, freeze_to
from cached_mslt.evaluation.probe import PROBE_FILE, fit_probe, linear_probe
from cached_mslt.evaluation.report import format_probes, format_results
from cached_mslt.evaluation.task_store import StoreLocation
from cached_mslt.evaluation.tasks import DEFAULT_TASK_DIR, prepare_task

__all__ = [
    "ClassifierTop",
    "DEFAULT_TASK_DIR",
    "fit_probe",
    "prepare_task",
    "PROBE_FILE",
    "RESULTS_FILE",
    "FinetuneArgs",
    "FinetuneError",
    "StoreLocation",
    "evaluate_checkpoint",
    "finetune",
    "format_probes",
    "format_results",
    "freeze_to",
    "linear_probe",
]


def evaluate_checkpoint(
    checkpoint: str | Path,
    args: FinetuneArgs,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    output_dir: str | Path | None = None,
    location: StoreLocation | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every evaluation `args.evaluation` asks for on every task of `args.task`: fine-tuning
    on all processes, then the probe (one forward pass) on the main process. Results are
    written under `output_dir` (default `args.output_dir`, else <checkpoint>/finetune) and
    returned as {"finetune": [...], "probe": [...]}, one entry per task. With
    `args.freeze_layers` both read the frozen bottom's stores at `location` (built once)."""
    if output_dir is not None:
        args = replace(args, output_dir=str(output_dir))
    out: dict[str, list[dict[str, Any]]] = {"finetune": [], "probe": []}
    if "finetune" in args.evaluation:
        out["finetune"] = [
            finetune(checkpoint, t, args, tokenizer=tokenizer, location=location) for t in args.task
        ]
    if "probe" in args.evaluation:
        # On every process: building (or opening) a store is collective; one fits.
        probes = [
            linear_probe(checkpoint, t, args, tokenizer=tokenizer, location=location)
            for t in args.task
        ]
        out["probe"] = probes if PartialState().is_main_process else []
    return out
