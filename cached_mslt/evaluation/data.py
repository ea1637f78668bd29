"""A task's examples for evaluation: split as the options say, tokenized, checked for
overlap with the pretraining corpus, and where their results go."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from accelerate.logging import get_logger
from datasets import DatasetDict
from transformers import PreTrainedTokenizerBase

from cached_mslt.data import DataError, load_corpus
from cached_mslt.evaluation.args import FinetuneArgs
from cached_mslt.evaluation.tasks import (
    Task,
    check_overlap,
    corpus_hashes,
    prepare_task,
)
from cached_mslt.rundir import RunLayout

logger = get_logger(__name__)


def task_from_args(name: str, args: FinetuneArgs, verbose: bool = True) -> Task:
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
