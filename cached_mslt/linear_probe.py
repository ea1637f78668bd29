"""Linear probe of a checkpoint's frozen encoder on a classification task.

Fine-tuning moves every weight, so on a small model its accuracy depends on the seed and
on how far the optimizer got as much as on what pretraining put into the encoder. A probe
does not train the encoder: it mean-pools the last hidden states of the frozen checkpoint
once and fits a multinomial logistic regression on them (L2 strength chosen on the
validation split), which is deterministic, needs no seeds and takes a forward pass. It
answers a narrower question (what a linear reader finds in the features), beside the
fine-tuning numbers rather than instead of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedModel, PreTrainedTokenizerBase

from cached_mslt.finetune import (
    FinetuneArgs,
    checkpoint_tokenizer,
    classification_metrics,
    load_classifier,
    load_task,
    result_header,
    task_output_dir,
    tokenize_task,
)
from cached_mslt.inspect.probe import fit_probe
from cached_mslt.inspect.text import mean_pool
from cached_mslt.metrics import markdown_table
from cached_mslt.tasks import Task

PROBE_FILE = "probe_results.json"
BATCH = 64


@torch.no_grad()
def encoder_features(
    model: PreTrainedModel, split: Dataset, collate: DataCollatorWithPadding
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled last hidden states of the encoder (not the pooler: an MLM checkpoint's
    pooler is new and random) and the labels, in the split's order."""
    model.eval()
    features, labels = [], []
    for batch in DataLoader(split, batch_size=BATCH, collate_fn=collate):
        ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        features.append(mean_pool(hidden, mask).cpu())
        labels.append(batch["labels"])
    return torch.cat(features), torch.cat(labels)


def linear_probe(
    checkpoint_dir: str | Path,
    task: str | Task,
    args: FinetuneArgs,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    model_class: type[PreTrainedModel] | None = None,
) -> dict[str, Any]:
    """Probe `checkpoint_dir` on `task`; returns and writes `<output_dir>/<task>/probe_results.json`.
    Uses the fine-tuning options for the task split, sequence length and train subset, so
    its numbers sit beside the fine-tuning ones on the same examples. One process."""
    checkpoint_dir = Path(checkpoint_dir)
    tokenizer = checkpoint_tokenizer(checkpoint_dir, tokenizer)
    task = task if isinstance(task, Task) else load_task(task, args)
    data = tokenize_task(task, tokenizer, args.max_seq_len, args.max_train_examples)
    model = load_classifier(checkpoint_dir, task.num_labels, model_class)
    model.to(PartialState().device)  # the process's accelerator, if it has one
    collate = DataCollatorWithPadding(tokenizer)
    x, y = {}, {}
    for name, split in data.items():
        x[name], y[name] = encoder_features(model, split, collate)
    fit = fit_probe(x, y, task.num_labels)
    test = classification_metrics(fit.test_predictions.numpy(), y["test"].numpy(), task.num_labels)
    result = {
        **result_header(task, checkpoint_dir, data),
        "features": "mean-pooled last hidden states, frozen encoder",
        "valid_accuracy": fit.valid_accuracy,
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "l2": fit.l2,
    }
    out_dir = task_output_dir(checkpoint_dir, args, task)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PROBE_FILE).write_text(json.dumps(result, indent=2))
    return result


def format_probes(results: list[dict[str, Any]]) -> str:
    """A Markdown table of `linear_probe` results, in %."""
    rows = [
        {
            "task": r["task"],
            "linear probe accuracy (%)": f"{100 * r['test_accuracy']:.1f}",
            "macro-F1 (%)": f"{100 * r['test_macro_f1']:.1f}",
            "majority class (%)": f"{100 * r['majority_accuracy']:.1f}",
            "L2": f"{r['l2']:g}",
        }
        for r in results
    ]
    return markdown_table(rows, list(rows[0]) if rows else [])
