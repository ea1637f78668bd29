"""Linear probe of a checkpoint's frozen encoder on a classification task.

Fine-tuning moves every weight, so on a small model its accuracy depends on the seed and
on how far the optimizer got as much as on what pretraining put into the encoder. A probe
does not train the encoder: it mean-pools the last hidden states of the frozen checkpoint
once and fits a multinomial logistic regression on them (L2 strength chosen on the
validation split), which is deterministic, needs no seeds and takes a forward pass. It
answers a narrower question (what a linear reader finds in the features), beside the
fine-tuning numbers rather than instead of them. `fit_probe` also serves the per-stage
probe of `cached_mslt.inspect.probe`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import PartialState
from datasets import Dataset
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedModel, PreTrainedTokenizerBase

from cached_mslt.evaluation.args import FinetuneArgs
from cached_mslt.evaluation.bottom import task_bottom
from cached_mslt.evaluation.checkpoint import checkpoint_tokenizer, load_classifier
from cached_mslt.evaluation.data import (
    result_header,
    task_from_args,
    task_output_dir,
    tokenize_task,
)
from cached_mslt.evaluation.report import classification_metrics
from cached_mslt.evaluation.task_store import StoreLocation, TaskStores
from cached_mslt.evaluation.tasks import Task
from cached_mslt.models import mean_pool, run_layers

PROBE_FILE = "probe_results.json"
BATCH = 64
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # chosen on the validation split


def train_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, full-batch L-BFGS from zero: deterministic."""
    w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


class ProbeFit(NamedTuple):
    valid_accuracy: float
    test_accuracy: float
    l2: float
    test_predictions: torch.Tensor


def fit_probe(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], num_classes: int) -> ProbeFit:
    """Probe on train, L2 chosen on validation (the first best on ties), scored on test.
    Features are standardised with training statistics, in float64."""
    mean, std = x["train"].mean(0), x["train"].std(0).clamp_min(1e-6)
    z = {k: ((v - mean) / std).double() for k, v in x.items()}

    best = None
    for l2 in L2_GRID:
        w, b = train_logistic(z["train"], y["train"], num_classes, l2)
        pred = {split: (z[split] @ w + b).argmax(-1) for split in ("validation", "test")}
        valid = float((pred["validation"] == y["validation"]).double().mean())
        if best is None or valid > best.valid_accuracy:
            test = float((pred["test"] == y["test"]).double().mean())
            best = ProbeFit(valid, test, l2, pred["test"])
    return best


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


@torch.no_grad()
def stored_features(model: PreTrainedModel, stores: TaskStores, split: str):
    """`encoder_features` from a store of the bottom K layers: the stored rows pushed
    through layers K.. only (the bottom is not run again), cut per batch to the longest row."""
    rows = stores.in_memory()[split]
    features = []
    for a in range(0, len(rows["labels"]), BATCH):
        mask = rows["attention_mask"][a : a + BATCH]
        length = int(mask.sum(1).max())
        hidden = rows["hidden"][a : a + BATCH, :length].to(model.device)
        mask = mask[:, :length].to(model.device)
        last = run_layers(model, hidden, mask, stores.depth)
        features.append(mean_pool(last, mask).cpu())
    return torch.cat(features), rows["labels"]


def linear_probe(
    checkpoint_dir: str | Path,
    task: str | Task,
    args: FinetuneArgs,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    model_class: type[PreTrainedModel] | None = None,
    location: StoreLocation | None = None,
) -> dict[str, Any]:
    """Probe `checkpoint_dir` on `task`; returns and writes `<output_dir>/<task>/probe_results.json`.
    Uses the fine-tuning options for the task split, sequence length and train subset, so
    its numbers sit beside the fine-tuning ones on the same examples. With
    `args.freeze_layers` K the features come from the task's store of the bottom K layers
    (built by every process, or reused) and only layers K.. run. The fit runs on the main
    process; the others return {}."""
    checkpoint_dir = Path(checkpoint_dir)
    tokenizer = checkpoint_tokenizer(checkpoint_dir, tokenizer)
    state = PartialState()
    if not isinstance(task, Task):
        with state.main_process_first():
            task = task_from_args(task, args, verbose=state.is_main_process)
    data = tokenize_task(task, tokenizer, args.max_seq_len, args.max_train_examples)
    out_dir = task_output_dir(checkpoint_dir, args, task)
    stores = None
    if args.freeze_layers > 0:
        root = str(out_dir.parent / "cache")
        loc = location or StoreLocation()
        stores = task_bottom(checkpoint_dir, task, data, tokenizer, args, loc, root, model_class)
    if not state.is_main_process:
        return {}
    model = load_classifier(checkpoint_dir, task.num_labels, model_class)
    model.to(state.device).eval()  # the process's accelerator, if it has one
    collate = DataCollatorWithPadding(tokenizer)
    x, y = {}, {}
    for name, split in data.items():
        if stores is None:
            x[name], y[name] = encoder_features(model, split, collate)
        else:
            x[name], y[name] = stored_features(model, stores, name)
    fit = fit_probe(x, y, task.num_labels)
    test = classification_metrics(fit.test_predictions.numpy(), y["test"].numpy(), task.num_labels)
    result = {
        **result_header(task, checkpoint_dir, data),
        "features": "mean-pooled last hidden states, frozen encoder",
        "frozen_bottom": stores.stats if stores is not None else None,
        "valid_accuracy": fit.valid_accuracy,
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "l2": fit.l2,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PROBE_FILE).write_text(json.dumps(result, indent=2))
    return result
