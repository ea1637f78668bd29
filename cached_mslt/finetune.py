"""Fine-tune a pretrained checkpoint on a classification task, over several seeds.

The loop is transformers' `run_glue_no_trainer.py` in miniature: `Accelerator()`, AdamW
without decay on biases and LayerNorms, a linear schedule with warmup, one validation pass
per epoch. The weights of the best validation epoch are tested, and training stops after
`early_stopping_patience` epochs without improvement. Each task writes
`<output_dir>/<task>/finetune_metrics.jsonl` (train loss every few steps, validation every
epoch, test per seed) and `finetune_results.json` (mean and std over seeds).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from datasets import DatasetDict
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
    set_seed,
)
from transformers.utils import logging as hf_logging

from cached_mslt.config import ConfigError
from cached_mslt.corpora import DataError, load_corpus
from cached_mslt.metrics import MetricsWriter
from cached_mslt.model import decay_param_groups
from cached_mslt.run_layout import RunLayout
from cached_mslt.tasks import DEFAULT_TASK_DIR, Task, check_overlap, corpus_hashes, prepare_task
from cached_mslt.tokenizer import check_vocab, load_tokenizer

logger = get_logger(__name__)

METRICS_FILE = "finetune_metrics.jsonl"
RESULTS_FILE = "finetune_results.json"


class FinetuneError(ValueError):
    """A checkpoint cannot be fine-tuned as asked; the message says why and what to pass."""


@dataclass
class FinetuneArgs:
    # Names that TrainArgs/DataArgs already use (seed, learning_rate, ...) carry a `finetune_`
    # or `task_` prefix: all groups share one flag namespace.
    checkpoint: str | None = field(
        default=None, metadata={"help": "BertForMaskedLM (or any local BERT) checkpoint dir"}
    )
    task: list[str] = field(
        default_factory=lambda: ["sentiment", "bbc"],
        metadata={"help": "'sentiment', 'bbc', or .csv/.jsonl files with text,label columns"},
    )
    label_names: list[str] | None = field(
        default=None, metadata={"help": "labels of a task file, in id order; others are refused"}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    output_dir: str | None = field(default=None, metadata={"help": "default <checkpoint>/finetune"})
    task_dir: str = field(default=DEFAULT_TASK_DIR, metadata={"help": "prepared tasks live here"})
    task_split_seed: int = field(default=0, metadata={"help": "seed of the train/valid/test split"})
    task_valid_fraction: float = 0.1
    task_test_fraction: float = 0.1
    max_seq_len: int = 128
    max_train_examples: int | None = field(
        default=None, metadata={"help": "fine-tune on a fixed random subset of the train split"}
    )
    finetune_batch_size: int = 32
    finetune_lr: float = 1e-4
    finetune_epochs: int = 3
    finetune_warmup_ratio: float = 0.1
    finetune_weight_decay: float = 0.01
    early_stopping_patience: int = field(
        # Not 1: a small encoder can spend a whole epoch on a plateau and still learn after
        # it (measured: a tiny bbc run stopped at 45.5% with 1 reached 53.1% without early
        # stopping; docs/evaluation.md).
        default=2,
        metadata={"help": "stop after this many epochs without a better validation"},
    )
    finetune_log_every: int = 20
    evaluation: list[str] = field(
        default_factory=lambda: ["finetune"],
        metadata={
            "help": "finetune and/or probe: a linear probe on the frozen encoder's mean-pooled "
            "features (deterministic, no seeds; writes probe_results.json beside the "
            "fine-tuning results)"
        },
    )
    overlap_corpus: list[str] | None = field(
        default=None,
        metadata={
            "help": "pretraining corpus specs (as --corpus) to check task texts against; "
            "default: the corpus in the config.json of the run that wrote the checkpoint; 'none'"
        },
    )

    def __post_init__(self) -> None:
        unknown = sorted(set(self.evaluation) - {"finetune", "probe"})
        if unknown or not self.evaluation:
            raise ConfigError(f"--evaluation takes finetune and/or probe, got {self.evaluation}")
        if not self.seeds:
            raise ConfigError("--seeds needs at least one seed")
        for name in ("finetune_epochs", "finetune_batch_size", "early_stopping_patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")


# --- metrics -----------------------------------------------------------------------------


def classification_metrics(
    preds: np.ndarray, labels: np.ndarray, num_labels: int
) -> dict[str, float]:
    """Accuracy and macro-F1 (mean over classes that occur in labels or predictions, as sklearn)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    confusion = np.bincount(labels * num_labels + preds, minlength=num_labels**2).reshape(
        num_labels, num_labels
    )
    true_pos = np.diag(confusion)
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (#predicted + #actual), per class.
    support = confusion.sum(0) + confusion.sum(1)
    f1 = 2 * true_pos[support > 0] / support[support > 0]
    return {"accuracy": float(true_pos.sum() / len(labels)), "macro_f1": float(f1.mean())}


@torch.no_grad()
def evaluate(
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


def _mean_std(values: list[float]) -> tuple[float, float]:
    # Sample std (ddof=1): the seeds are a sample of the runs one could have made.
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


# --- model and data ----------------------------------------------------------------------


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


def load_classifier(
    checkpoint_dir: str | Path,
    num_labels: int,
    model_class: type[PreTrainedModel] | None = None,
) -> PreTrainedModel:
    """The checkpoint's encoder under a new classification head (`model_class`, default:
    the one for the checkpoint's architecture, `classifier_class`).

    An MLM checkpoint has no pooler and no classifier, so those start random, and its MLM head
    is left out: that is what fine-tuning is, yet transformers prints it as a warning table.
    We silence the table and check the lists ourselves: anything else missing means the
    checkpoint is not the encoder it claims to be.
    """
    # A filter, not a higher level: at WARNING or above transformers also runs (and logs)
    # its tensor-parallel plan check.
    hf_logger = hf_logging.get_logger("transformers.modeling_utils")
    hf_logger.addFilter(_drop_load_report)
    model_class = model_class or classifier_class(checkpoint_dir)
    try:
        model, info = model_class.from_pretrained(
            str(checkpoint_dir),
            num_labels=num_labels,
            output_loading_info=True,
            local_files_only=True,
        )
    except OSError as e:
        raise FinetuneError(f"cannot load a model from {checkpoint_dir}: {e}") from e
    finally:
        hf_logger.removeFilter(_drop_load_report)
    new_head = ("classifier.", f"{model.base_model_prefix}.pooler.")
    missing = sorted(info["missing_keys"])
    not_head = [k for k in missing if not k.startswith(new_head)]
    if not_head:
        raise FinetuneError(
            f"{checkpoint_dir} lacks encoder weights {not_head[:4]} ({len(not_head)} in all); "
            "pass a BERT checkpoint written with save_pretrained"
        )
    logger.info(
        f"loaded the encoder from {checkpoint_dir}; new, randomly initialised as expected: "
        f"{sorted({k.rsplit('.', 1)[0] for k in missing})}; left out: "
        f"{len(info['unexpected_keys'])} tensors of the pretraining head"
    )
    return model


def checkpoint_tokenizer(
    checkpoint_dir: Path, tokenizer: PreTrainedTokenizerBase | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer to evaluate a checkpoint with: `tokenizer`, else the checkpoint's own
    (stage checkpoints are saved with theirs), else the bundled one; checked against the
    checkpoint's vocabulary. A directory that is not a checkpoint is refused here, first."""
    if not (checkpoint_dir / "config.json").is_file():
        raise FinetuneError(
            f"{checkpoint_dir} is not a checkpoint (no config.json); "
            "pass a directory written by save_pretrained"
        )
    if tokenizer is None:
        has_own = any((checkpoint_dir / f).is_file() for f in ("tokenizer.json", "vocab.txt"))
        tokenizer = load_tokenizer(str(checkpoint_dir) if has_own else "bundled")
    vocab_size = json.loads((checkpoint_dir / "config.json").read_text())["vocab_size"]
    check_vocab(tokenizer, vocab_size, source=f"checkpoint {checkpoint_dir}")
    return tokenizer


def load_task(name: str, args: FinetuneArgs, verbose: bool = True) -> Task:
    """A task by name or file, split as `args` says (prepared once, then read back)."""
    return prepare_task(
        name,
        args.task_dir,
        seed=args.task_split_seed,
        valid_fraction=args.task_valid_fraction,
        test_fraction=args.task_test_fraction,
        label_names=args.label_names,
        verbose=verbose,
    )


def classifier_class(checkpoint: Path) -> type[PreTrainedModel]:
    """The sequence-classification class for a checkpoint's architecture."""
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    if config.get("model_type") == "preln-bert":
        from cached_mslt.methods.pld import PreLNBertForSequenceClassification

        return PreLNBertForSequenceClassification
    return BertForSequenceClassification


def tokenize_task(
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    max_train_examples: int | None = None,
) -> DatasetDict:
    splits = DatasetDict(task.splits)
    if max_train_examples and len(splits["train"]) > max_train_examples:
        # One fixed subset for every seed, so seeds differ only in initialisation and order.
        splits["train"] = splits["train"].shuffle(seed=0).select(range(max_train_examples))
    splits = splits.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_seq_len),
        batched=True,
        remove_columns=["id", "text"],
        keep_in_memory=True,  # nothing written next to the prepared task
    )
    # Evaluation order is free, so sort by length: batches of alike lengths pad little, which
    # halves evaluation time on the short sentiment snippets.
    for split in ("validation", "test"):
        lengths = [len(ids) for ids in splits[split]["input_ids"]]
        splits[split] = splits[split].select(np.argsort(lengths, kind="stable"))
    return splits


# --- overlap with the pretraining corpus ---------------------------------------------------


def run_corpus(checkpoint_dir: Path) -> list[str] | None:
    """The --corpus of the run that wrote a checkpoint, if its config.json is found."""
    run = RunLayout.of_checkpoint(checkpoint_dir)
    data = run.read_config().get("data") if run else None
    return list(data["corpus"]) if isinstance(data, dict) and data.get("corpus") else None


@functools.lru_cache(maxsize=4)
def _hashes_of(specs: tuple[str, ...]) -> frozenset[str]:
    # Cached: one pipeline call checks every task against the same corpus.
    return frozenset(corpus_hashes(load_corpus(list(specs)).documents))


def pretraining_overlap(task: Task, checkpoint_dir: Path, specs: list[str] | None) -> dict | None:
    """Per-split counts of task examples found in the pretraining corpus (warns if any)."""
    if specs == ["none"]:
        return None
    if specs:
        return check_overlap(task, _hashes_of(tuple(specs)), hashed=True)
    specs = run_corpus(checkpoint_dir)
    if specs is None:
        logger.info(f"no run config next to {checkpoint_dir}; --overlap_corpus checks task overlap")
        return None
    try:
        return check_overlap(task, _hashes_of(tuple(specs)), hashed=True)
    except DataError as e:  # the run's corpus may live on another machine
        logger.warning(f"cannot check task overlap with the run's corpus {specs}: {e}")
        return None


# --- training ----------------------------------------------------------------------------


def _fit(
    model: PreTrainedModel,
    data: DatasetDict,
    collate: DataCollatorWithPadding,
    args: FinetuneArgs,
    accelerator: Accelerator,
    log: Callable[[dict[str, Any]], None],
    desc: str,
) -> dict[str, Any]:
    """Train with early stopping on validation, then test the best epoch's weights."""
    num_labels = model.config.num_labels
    train_dl = DataLoader(
        data["train"], shuffle=True, batch_size=args.finetune_batch_size, collate_fn=collate
    )
    valid_dl, test_dl = (
        DataLoader(data[s], batch_size=2 * args.finetune_batch_size, collate_fn=collate)
        for s in ("validation", "test")
    )
    optimizer = torch.optim.AdamW(
        decay_param_groups(model, args.finetune_weight_decay), lr=args.finetune_lr
    )
    # Counted before prepare, over all processes: the prepared scheduler steps once per
    # process for every optimizer step.
    total_steps = len(train_dl) * args.finetune_epochs
    warmup_steps = math.ceil(args.finetune_warmup_ratio * total_steps)
    lr_scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    model, optimizer, train_dl, valid_dl, test_dl, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dl, valid_dl, test_dl, lr_scheduler
    )

    step, best, best_epoch, best_state, stale = 0, None, -1, None, 0
    for epoch in range(args.finetune_epochs):
        model.train()
        losses = []
        bar = tqdm(
            train_dl, desc=f"{desc} epoch {epoch}", disable=not accelerator.is_local_main_process
        )
        for batch in bar:
            loss = model(**batch).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            step += 1
            losses.append(loss.item())
            if step % args.finetune_log_every == 0:
                lr = lr_scheduler.get_last_lr()[0]
                log({"epoch": epoch, "step": step, "train_loss": float(np.mean(losses)), "lr": lr})
                losses = []
        valid = evaluate(model, valid_dl, accelerator, num_labels)
        log({"epoch": epoch, "step": step, **{f"valid_{k}": v for k, v in valid.items()}})
        # Ties in accuracy are common early on (a model stuck on one class), so lower
        # validation loss also counts as progress; otherwise such runs would stop at epoch 1.
        if best is None or (valid["accuracy"], -valid["loss"]) > (best["accuracy"], -best["loss"]):
            best, best_epoch, stale = valid, epoch, 0
            # Kept in memory: a few MB for tiny models, 440 MB for bert-base.
            state = accelerator.unwrap_model(model).state_dict()
            best_state = {k: v.detach().clone() for k, v in state.items()}
        else:
            stale += 1
            if stale >= args.early_stopping_patience:
                break
    accelerator.unwrap_model(model).load_state_dict(best_state)
    test = evaluate(model, test_dl, accelerator, num_labels)
    accelerator.free_memory()
    return {
        "best_epoch": best_epoch,
        "epochs_run": epoch + 1,
        "steps": step,
        "valid_accuracy": best["accuracy"],
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "test_loss": test["loss"],
    }


def finetune(
    checkpoint_dir: str | Path,
    task: str | Task,
    args: FinetuneArgs,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    model_class: type[PreTrainedModel] | None = None,
) -> dict[str, Any]:
    """Fine-tune `checkpoint_dir` on `task` once per seed in `args.seeds` and test each run.

    `task` is a prepared `Task` or a name for `prepare_task`. `model_class` is any
    `...ForSequenceClassification` whose `from_pretrained` reads the checkpoint (default:
    the one for the checkpoint's architecture, `classifier_class`).
    Returns (and writes to `finetune_results.json`) the per-seed runs and their summary.
    """
    checkpoint_dir = Path(checkpoint_dir)
    tokenizer = checkpoint_tokenizer(checkpoint_dir, tokenizer)
    accelerator = Accelerator()
    if not isinstance(task, Task):
        with accelerator.main_process_first():  # rank 0 prepares, the others read its files
            task = load_task(task, args, verbose=accelerator.is_main_process)
    overlap = None
    if accelerator.is_main_process:
        overlap = pretraining_overlap(task, checkpoint_dir, args.overlap_corpus)
    data = tokenize_task(task, tokenizer, args.max_seq_len, args.max_train_examples)
    collate = DataCollatorWithPadding(tokenizer)

    out_dir = task_output_dir(checkpoint_dir, args, task)
    # The one metrics writer, under its own file name: a fine-tuning log must not mix with
    # the pretraining metrics.jsonl of the run it evaluates.
    writer = MetricsWriter(out_dir, accelerator, base={"task": task.name}, filename=METRICS_FILE)
    if accelerator.is_main_process:
        writer.path.unlink(missing_ok=True)
    runs = []
    for seed in args.seeds:
        set_seed(seed)  # before loading: the new classifier head is drawn from this seed
        start = time.perf_counter()
        model = load_classifier(checkpoint_dir, task.num_labels, model_class)
        writer.base["seed"] = seed
        run = _fit(model, data, collate, args, accelerator, writer.log, f"{task.name} seed {seed}")
        run = {"seed": seed, **run, "seconds": time.perf_counter() - start}
        writer.log({"split": "test", **run})
        runs.append(run)

    acc_mean, acc_std = _mean_std([r["test_accuracy"] for r in runs])
    f1_mean, f1_std = _mean_std([r["test_macro_f1"] for r in runs])
    result = {
        **result_header(task, checkpoint_dir, data),
        "accuracy_mean": acc_mean,
        "accuracy_std": acc_std,
        "macro_f1_mean": f1_mean,
        "macro_f1_std": f1_std,
        "pretraining_overlap": overlap,
        "runs": runs,
        "args": dataclasses.asdict(args),
    }
    if accelerator.is_main_process:
        (out_dir / RESULTS_FILE).write_text(json.dumps(result, indent=2))
    return result


def task_output_dir(checkpoint_dir: Path, args: FinetuneArgs, task: Task) -> Path:
    """Where a task's evaluation files go: <output_dir or checkpoint/finetune>/<task>."""
    return Path(args.output_dir or checkpoint_dir / "finetune") / task.name


def result_header(task: Task, checkpoint_dir: Path, data: DatasetDict) -> dict[str, Any]:
    """What every evaluation result starts with: which task, checkpoint and examples."""
    test_labels = np.asarray(task.splits["test"]["label"])
    return {
        "task": task.name,
        "checkpoint": str(checkpoint_dir),
        "task_fingerprint": task.fingerprint,
        "num_labels": task.num_labels,
        "sizes": {split: len(data[split]) for split in data},
        "majority_accuracy": float(np.bincount(test_labels).max() / len(test_labels)),
    }


def format_results(results: list[dict[str, Any]]) -> str:
    """A Markdown table of `finetune` results: accuracy and macro-F1 as mean +/- std in %."""
    lines = [
        "| task | test examples | seeds | accuracy (%) | macro-F1 (%) | majority class (%) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        acc = f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f}"
        f1 = f"{100 * r['macro_f1_mean']:.1f} ± {100 * r['macro_f1_std']:.1f}"
        lines.append(
            f"| {r['task']} | {r['sizes']['test']:,} | {len(r['runs'])} | {acc} | {f1} "
            f"| {100 * r['majority_accuracy']:.1f} |"
        )
    return "\n".join(lines)
