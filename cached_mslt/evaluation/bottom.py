"""The frozen bottom of a fine-tuning run: the checkpoint's embeddings and first K layers,
and their outputs over a task's splits in stores built once for every seed and learning
rate (`task_store`), or the padded rows alone when nothing is frozen yet (K = 0)."""

from __future__ import annotations

from pathlib import Path

from datasets import DatasetDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cached_mslt.evaluation.args import FinetuneArgs
from cached_mslt.evaluation.checkpoint import load_classifier
from cached_mslt.evaluation.frozen_top import check_freezable, freeze_to
from cached_mslt.evaluation.task_store import (
    SPLITS,
    StoreLocation,
    TaskStores,
    build_task_stores,
    padded_columns,
    store_length,
)
from cached_mslt.evaluation.tasks import Task


def task_bottom(
    checkpoint_dir: Path,
    task: Task,
    data: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    args: FinetuneArgs,
    location: StoreLocation,
    default_root: str,
    model_class: type[PreTrainedModel] | None = None,
) -> TaskStores:
    """The stores of the checkpoint's bottom `args.freeze_layers` deep over `task` (built
    on every process, or reused), at `location`'s `<root>/<task>/frozen-K/<split>`."""
    depth = args.freeze_layers
    model = load_classifier(checkpoint_dir, task.num_labels, model_class)
    check_freezable(model, depth)
    freeze_to(model, depth)
    length = store_length(data)
    columns = {s: padded_columns(data[s], length, tokenizer.pad_token_id) for s in SPLITS}
    if depth == 0 or not args.freeze_cache:
        # Nothing frozen yet (progressive: its first freeze builds the store), or the
        # bottom runs live: no store.
        stats = {"depth": depth, "cpu_s": 0.0, "wall_s": 0.0, "rows": 0, "store": False}
        return TaskStores(depth, {}, columns, stats)
    urls = {s: location.url(default_root, task.name, depth, s) for s in SPLITS}
    return build_task_stores(
        model, columns, urls, depth, args, location, task_fingerprint=task.fingerprint
    )
