"""Fine-tune a pretrained checkpoint on a classification task, over several seeds.

The loop is transformers' `run_glue_no_trainer.py` in miniature: `Accelerator()`, AdamW
without decay on biases and LayerNorms, a linear schedule with warmup, one validation pass
per epoch. The weights of the best validation epoch are tested, and training stops after
`early_stopping_patience` epochs without improvement. Each task writes
`<output_dir>/<task>/finetune_metrics.jsonl` (train loss every few steps, validation every
epoch, test per seed) and `finetune_results.json` (mean and std over seeds).

With `--freeze_layers K` (or `--freeze progressive`) the same loop trains a `ClassifierTop`
(layers K.., pooler, classifier) from the task's stores of the frozen bottom, built once
before the first seed (`bottom.task_bottom`); docs/evaluation.md, fine-tuning from the cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
    set_seed,
)

from cached_mslt.evaluation.args import FinetuneArgs
from cached_mslt.evaluation.bottom import task_bottom
from cached_mslt.evaluation.checkpoint import checkpoint_tokenizer, load_classifier
from cached_mslt.evaluation.data import (
    pretraining_overlap,
    result_header,
    task_from_args,
    task_output_dir,
    tokenize_task,
)
from cached_mslt.evaluation.frozen_top import (
    AutoFreezeTest,
    ClassifierTop,
    FrozenRows,
    classifier_module,
    freeze_to,
)
from cached_mslt.evaluation.progressive import Extend, ProgressiveFreezing
from cached_mslt.evaluation.report import classification_metrics, mean_std
from cached_mslt.evaluation.task_store import SPLITS, StoreLocation, TaskStores, build_task_stores
from cached_mslt.evaluation.tasks import Task
from cached_mslt.models import decay_param_groups
from cached_mslt.training import MetricsWriter

FINETUNE_METRICS_FILE = "finetune_metrics.jsonl"
RESULTS_FILE = "finetune_results.json"
Log = Callable[[dict[str, Any]], None]


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module, dataloader: DataLoader, accelerator: Accelerator, num_labels: int
) -> dict[str, float]:
    """Accuracy, macro-F1 and mean loss over every example of `dataloader`, all processes."""
    model.eval()
    preds, labels, losses = [], [], []
    for batch in dataloader:
        logits = model(**batch).logits
        loss = F.cross_entropy(logits, batch["labels"], reduction="none")
        # gather_for_metrics drops the samples DistributedSampler repeats to even out ranks.
        gathered = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], loss))
        for out, t in zip((preds, labels, losses), gathered):
            out.append(t.cpu())
    metrics = classification_metrics(
        torch.cat(preds).numpy(), torch.cat(labels).numpy(), num_labels
    )
    return {**metrics, "loss": float(torch.cat(losses).mean())}


def _optimizer(model: torch.nn.Module, args: FinetuneArgs, steps_per_epoch: int, lr: float):
    """AdamW over the parameters that train (a frozen bottom is never handed to it) and its
    linear schedule with warmup. Steps are counted before `prepare`, over all processes:
    the prepared scheduler steps once per process for every optimizer step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        decay_param_groups(model, args.finetune_weight_decay, trainable), lr=lr
    )
    total_steps = steps_per_epoch * args.finetune_epochs
    warmup_steps = math.ceil(args.finetune_warmup_ratio * total_steps)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)


@dataclass
class _Training:
    """What one fine-tuning run steps through, prepared by Accelerate."""

    model: PreTrainedModel
    train_dl: DataLoader
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    accelerator: Accelerator
    args: FinetuneArgs
    log: Log
    desc: str
    freezing: ProgressiveFreezing | None = None


def _train_epoch(run: _Training, epoch: int, step: int) -> int:
    """One pass over the training split; returns the optimizer step count after it."""
    run.model.train()
    losses = []
    bar = tqdm(
        run.train_dl,
        desc=f"{run.desc} epoch {epoch}",
        disable=not run.accelerator.is_local_main_process,
    )
    for batch in bar:
        loss = run.model(**batch).loss
        run.accelerator.backward(loss)
        if run.freezing is not None:
            run.freezing.after_backward(run.model)
        run.accelerator.clip_grad_norm_(run.model.parameters(), 1.0)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad()
        step += 1
        if run.freezing is not None:  # may freeze more layers: a new top, fewer parameters
            run.model = run.freezing.after_step(run.model, run.optimizer, step, epoch)
        losses.append(loss.item())
        if step % run.args.finetune_log_every == 0:
            lr = run.lr_scheduler.get_last_lr()[0]
            run.log({"epoch": epoch, "step": step, "train_loss": float(np.mean(losses)), "lr": lr})
            losses = []
    return step


def _loaders(data, collate, batch_size: int) -> list[DataLoader]:
    """Train (shuffled), validation and test loaders; evaluation at twice the batch."""
    return [
        DataLoader(
            data[s],
            shuffle=s == "train",
            batch_size=batch_size if s == "train" else 2 * batch_size,
            collate_fn=collate[s],
        )
        for s in SPLITS
    ]


def _fit(
    model: torch.nn.Module,
    data: dict[str, Any],
    collate: dict[str, Callable],
    args: FinetuneArgs,
    accelerator: Accelerator,
    log: Log,
    desc: str,
    lr: float,
    freezing: ProgressiveFreezing | None = None,
) -> dict[str, Any]:
    """Train with early stopping on validation, then test the best epoch's weights.
    `data` and `collate` per split; `freezing` freezes layers as they converge."""
    num_labels = model.config.num_labels
    train_dl, valid_dl, test_dl = _loaders(data, collate, args.finetune_batch_size)
    optimizer, lr_scheduler = _optimizer(model, args, len(train_dl), lr)
    model, optimizer, train_dl, valid_dl, test_dl, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dl, valid_dl, test_dl, lr_scheduler
    )
    if freezing is not None:
        freezing.start(accelerator, log, args.freeze_interval or len(train_dl))
    run = _Training(
        model, train_dl, optimizer, lr_scheduler, accelerator, args, log, desc, freezing
    )
    step, best, best_epoch, best_state, stale = 0, None, -1, None, 0
    for epoch in range(args.finetune_epochs):
        step = _train_epoch(run, epoch, step)
        valid = evaluate_classifier(run.model, valid_dl, accelerator, num_labels)
        log({"epoch": epoch, "step": step, **{f"valid_{k}": v for k, v in valid.items()}})
        # Ties in accuracy are common early on (a model stuck on one class), so lower
        # validation loss also counts as progress; otherwise such runs would stop at epoch 1.
        if best is None or (valid["accuracy"], -valid["loss"]) > (best["accuracy"], -best["loss"]):
            best, best_epoch, stale = valid, epoch, 0
            # Kept in memory: a few MB for tiny models, 440 MB for bert-base.
            state = accelerator.unwrap_model(run.model).state_dict()
            best_state = {k: v.detach().clone() for k, v in state.items()}
            best_depth = freezing.depth if freezing is not None else None
        else:
            stale += 1
            if stale >= args.early_stopping_patience:
                break
    accelerator.unwrap_model(run.model).load_state_dict(best_state)
    # The best epoch may predate a freeze: test it on the store of its own depth.
    tested = run.model if freezing is None else freezing.restore(run.model, best_depth)
    test = evaluate_classifier(tested, test_dl, accelerator, num_labels)
    accelerator.free_memory()
    return {
        "best_epoch": best_epoch,
        "epochs_run": epoch + 1,
        "steps": step,
        "valid_accuracy": best["accuracy"],
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "test_loss": test["loss"],
        **(freezing.summary(best_depth) if freezing is not None else {}),
    }


def _over_seeds(runs: list[dict[str, Any]]) -> dict[str, float]:
    acc_mean, acc_std = mean_std([r["test_accuracy"] for r in runs])
    f1_mean, f1_std = mean_std([r["test_macro_f1"] for r in runs])
    valid_mean, _ = mean_std([r["valid_accuracy"] for r in runs])
    return {
        "accuracy_mean": acc_mean,
        "accuracy_std": acc_std,
        "macro_f1_mean": f1_mean,
        "macro_f1_std": f1_std,
        "valid_accuracy_mean": valid_mean,
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds; with several learning rates, each rate's, and at the top
    level the rate with the best mean validation accuracy (the test split never chooses)."""
    sweep = [
        {"lr": lr, **_over_seeds([r for r in runs if r["lr"] == lr])}
        for lr in dict.fromkeys(r["lr"] for r in runs)
    ]
    best = max(sweep, key=lambda s: s["valid_accuracy_mean"])
    return {**best, "sweep": sweep} if len(sweep) > 1 else best


def _fit_frozen(
    model: PreTrainedModel,
    base: TaskStores,
    args: FinetuneArgs,
    extend_at: Callable[[str], Extend],
    accelerator: Accelerator,
    log: Log,
    desc: str,
    lr: float,
) -> dict[str, Any]:
    """One run over a frozen bottom: the top trains from `base`'s stores (or, without
    --freeze_cache, from the bottom run live), freezing more as it converges if progressive.
    `extend_at(tag)` builds a run's deeper stores under its own tag."""
    freeze_to(model, base.depth)
    rows = FrozenRows(base, model, use_store=args.freeze_cache)
    freezing = None
    if args.freeze == "progressive":
        test = AutoFreezeTest(
            model.config.num_hidden_layers, args.freeze_percentile, args.freeze_keep
        )
        freezing = ProgressiveFreezing(rows, base, extend_at(desc), test)
    data = {s: rows.dataset(s) for s in SPLITS}
    collate = {s: rows.collate(s) for s in SPLITS}
    top = ClassifierTop(model, base.depth)
    return _fit(top, data, collate, args, accelerator, log, desc, lr, freezing)


def _extender(args, location, default_root, task) -> Callable[[str], Extend]:
    """Progressive freezing's store builds: a run's deeper stores live under its own tag
    (its layers are its own) and are rebuilt each time (scratch, not shared)."""

    def at(tag: str) -> Extend:
        def extend(model, depth, source):
            tagged = "run-" + tag.replace(" ", "-")
            urls = {s: location.url(default_root, task.name, depth, s, tagged) for s in SPLITS}
            return build_task_stores(
                model,
                source.columns,
                urls,
                depth,
                args,
                location,
                task_fingerprint=task.fingerprint,
                source=source,
                overwrite=True,
            )

        return extend

    return at


def _sweep(checkpoint_dir, task, args, writer, train_one, model_class) -> list[dict[str, Any]]:
    """One run per learning rate and seed, each from a fresh copy of the checkpoint."""
    runs = []
    for lr in args.finetune_lr:
        for seed in args.seeds:
            set_seed(seed)  # before loading: the new classifier head is drawn from this seed
            start, cpu = time.perf_counter(), time.process_time()
            model = load_classifier(checkpoint_dir, task.num_labels, model_class)
            writer.base.update(seed=seed, lr=lr)
            run = train_one(model, f"{task.name} lr {lr:g} seed {seed}", lr)
            seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
            run = {"seed": seed, "lr": lr, **run, "seconds": seconds, "cpu_s": cpu_s}
            writer.log({"split": "test", **run})
            runs.append(run)
    return runs


def finetune(
    checkpoint_dir: str | Path,
    task: str | Task,
    args: FinetuneArgs,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    model_class: type[PreTrainedModel] | None = None,
    location: StoreLocation | None = None,
) -> dict[str, Any]:
    """Fine-tune `checkpoint_dir` on `task` once per learning rate and seed and test each run.

    `task` is a prepared `Task` or a name for `prepare_task`. `model_class` is any
    `...ForSequenceClassification` whose `from_pretrained` reads the checkpoint (default:
    the one the Auto classes register). With `args.freeze_layers` (or progressive freezing)
    the frozen bottom's outputs are built once into stores at `location` (default: under
    the output directory) and every run trains its top from them. Returns (and writes to
    `finetune_results.json`) the per-seed runs and their summary."""
    checkpoint_dir = Path(checkpoint_dir)
    tokenizer = checkpoint_tokenizer(checkpoint_dir, tokenizer)
    accelerator = Accelerator()
    if not isinstance(task, Task):
        with accelerator.main_process_first():  # rank 0 prepares, the others read its files
            task = task_from_args(task, args, verbose=accelerator.is_main_process)
    overlap = None
    if accelerator.is_main_process:
        overlap = pretraining_overlap(task, checkpoint_dir, args.overlap_corpus)
    data = tokenize_task(task, tokenizer, args.max_seq_len, args.max_train_examples)
    out_dir = task_output_dir(checkpoint_dir, args, task)
    # The one metrics writer, under its own file name: a fine-tuning log must not mix with
    # the pretraining metrics.jsonl of the run it evaluates.
    writer = MetricsWriter(
        out_dir, accelerator, base={"task": task.name}, filename=FINETUNE_METRICS_FILE
    )
    base = None
    if args.freezes:  # built (or reused) once, before the first run
        root, location = str(out_dir.parent / "cache"), location or StoreLocation()
        base = task_bottom(checkpoint_dir, task, data, tokenizer, args, location, root, model_class)
        extend_at = _extender(args, location, root, task)

        def train_one(model, desc, lr):
            return _fit_frozen(model, base, args, extend_at, accelerator, writer.log, desc, lr)
    else:
        collate = dict.fromkeys(SPLITS, DataCollatorWithPadding(tokenizer))

        def train_one(model, desc, lr):
            top = classifier_module(model)
            return _fit(top, data, collate, args, accelerator, writer.log, desc, lr)

    if accelerator.is_main_process:
        writer.path.unlink(missing_ok=True)
    runs = _sweep(checkpoint_dir, task, args, writer, train_one, model_class)
    result = {
        **result_header(task, checkpoint_dir, data),
        **_summary(runs),
        "frozen_bottom": base.stats if base is not None else None,
        "pretraining_overlap": overlap,
        "runs": runs,
        "args": dataclasses.asdict(args),
    }
    return _written(result, out_dir, accelerator)


def _written(result: dict[str, Any], out_dir: Path, accelerator: Accelerator) -> dict[str, Any]:
    if accelerator.is_main_process:
        (out_dir / RESULTS_FILE).write_text(json.dumps(result, indent=2))
    return result
