"""Fine-tuning the top of a classifier over a frozen bottom: the trainable module, the rows
it reads (from a store, or computed live by the frozen bottom), and AutoFreeze's test for
freezing the next layer (docs/evaluation.md, fine-tuning from the cache)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from cached_mslt.evaluation.args import FinetuneError
from cached_mslt.evaluation.task_store import ROW_LENGTH_MULTIPLE, TaskStores
from cached_mslt.models import (
    first_position_layer,
    frozen_modules,
    layer_mask,
)
from cached_mslt.stages import frozen_output


def _bert_classifier(model: PreTrainedModel) -> bool:
    """BertForSequenceClassification's layout: `.bert` (embeddings, layers, pooler),
    `.dropout` and `.classifier`."""
    return all(hasattr(model, a) for a in ("bert", "classifier", "dropout"))


def classifier_module(model: PreTrainedModel) -> nn.Module:
    """What full fine-tuning trains: a BERT classifier as the top with nothing frozen (so
    it runs the [CLS]-only last layer the frozen tops run), any other model as it is."""
    return ClassifierTop(model, 0) if _bert_classifier(model) else model


def check_freezable(model: PreTrainedModel, depth: int) -> None:
    """A BERT classifier (`.bert` encoder, pooler and `.classifier`) with more than `depth`
    layers: the top needs at least one to train."""
    if not _bert_classifier(model):
        raise FinetuneError(
            f"--freeze_layers needs a BertForSequenceClassification-like model (bert, dropout, "
            f"classifier); got {type(model).__name__}. Fine-tune it without --freeze_layers"
        )
    layers = model.config.num_hidden_layers
    if not 0 <= depth < layers:
        raise FinetuneError(
            f"--freeze_layers {depth}: the checkpoint has {layers} encoder layers and at least "
            f"one must train; pass a value in 0..{layers - 1}"
        )


def freeze_to(model: PreTrainedModel, depth: int) -> None:
    """The embeddings and layers [0, depth) frozen for real: no gradient, eval mode."""
    for module in frozen_modules(model, depth):
        module.requires_grad_(False)
        module.eval()


class ClassifierTop(nn.Module):
    """Layers [frozen, L), the pooler and the classifier of a BertForSequenceClassification,
    as one module: what trains, and all `accelerator.prepare` wraps (DDP all-reduces only
    these gradients). From hidden states at depth `frozen`, or token ids when it is 0 (full
    fine-tuning is this top with nothing frozen). Its logits and loss are the model's own
    (`BertForSequenceClassification.forward`) up to float rounding: the pooler reads
    position 0 alone, so the last layer runs for that position only
    (`first_position_layer`: docs/evaluation.md, the [CLS]-only last layer);
    `first_position_only=False` runs the whole last layer (the benchmark's reference)."""

    def __init__(self, model: PreTrainedModel, frozen: int, first_position_only: bool = True):
        super().__init__()
        self.model = model
        self.frozen = frozen
        self.first_position_only = first_position_only

    @property
    def config(self):
        return self.model.config

    def train(self, mode: bool = True) -> ClassifierTop:
        super().train(mode)
        for module in frozen_modules(self.model, self.frozen):
            module.eval()  # the frozen bottom never leaves eval mode (dropout off)
        return self

    def forward(
        self,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
        hidden_states: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        depth: int | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        """`depth`: what the batch holds (token ids at 0, else hidden states after that
        many layers); below `frozen` for a batch collated before a freeze (the prepared
        loader reads one batch ahead), which then runs through the layers it lacks, all
        frozen, first: as the deeper store holds them (up to rounding for a row whose
        computed length the batch's cut shortened). `token_type_ids` only with token
        ids and nothing frozen (a store holds hidden states, computed without them)."""
        m, depth = self.model, self.frozen if depth is None else depth
        if depth < self.frozen:
            with torch.no_grad():
                hidden_states = frozen_rows(
                    m, attention_mask, self.frozen, input_ids, hidden_states, depth
                )
        elif self.frozen == 0:
            hidden_states = m.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        last = m.config.num_hidden_layers - 1
        mask = layer_mask(m, hidden_states, attention_mask)
        for layer in m.bert.encoder.layer[self.frozen : last]:
            hidden_states = layer(hidden_states, mask)
        if self.first_position_only:
            first = first_position_layer(m.bert.encoder.layer[last], hidden_states, mask)
        else:
            first = m.bert.encoder.layer[last](hidden_states, mask)[:, :1]
        logits = m.classifier(m.dropout(m.bert.pooler(first)))
        loss = F.cross_entropy(logits.view(-1, m.config.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _cut(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch cut to its longest row: the columns dropped are padding in every row."""
    length = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :length] if torch.is_tensor(v) and v.dim() > 1 else v for k, v in batch.items()}


class FrozenRows:
    """What the top reads for a list of row indices of a split, at the current depth: the
    stored hidden states (`use_store`), or the frozen bottom run live on the rows padded
    as the store's were; either way cut to the batch's longest row. Item i of a split's
    dataset is the index i, so both see the same rows in the same order."""

    def __init__(self, stores: TaskStores, model: PreTrainedModel, use_store: bool = True):
        self.model, self.use_store = model, use_store
        self.load(stores)

    def load(self, stores: TaskStores) -> None:
        self.depth, self.columns = stores.depth, stores.columns
        self.rows = stores.in_memory() if self.use_store and stores.depth > 0 else {}

    def dataset(self, split: str) -> list[int]:
        return list(range(len(self.columns[split]["input_ids"])))

    def collate(self, split: str):
        return lambda rows: self._batch(split, torch.as_tensor(rows, dtype=torch.long))

    @torch.no_grad()
    def _batch(self, split: str, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        cols = {k: torch.from_numpy(v[rows.numpy()]) for k, v in self.columns[split].items()}
        out = {
            "attention_mask": cols["attention_mask"],
            "labels": cols["labels"][:, 0],
            "depth": self.depth,
        }
        if self.depth == 0:
            out["input_ids"] = cols["input_ids"]
        elif self.rows:
            out["hidden_states"] = self.rows[split]["hidden"][rows]
        else:  # live: each row at its own length, before the cut, as the build ran it
            out["hidden_states"] = frozen_rows(
                self.model, cols["attention_mask"], self.depth, cols["input_ids"]
            )
        return _cut(out)


def frozen_rows(
    model: PreTrainedModel,
    attention_mask: torch.Tensor,
    depth: int,
    input_ids: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    start: int = 0,
) -> torch.Tensor:
    """The frozen bottom's output at `depth` as a float32 task store holds it: the build's
    own `frozen_output`, from token ids or from `hidden` at depth `start`, each row at its
    own length."""
    return frozen_output(
        model, attention_mask, stop=depth, dtype=torch.float32, input_ids=input_ids,
        previous=hidden, start=start, length_multiple=ROW_LENGTH_MULTIPLE,
    )  # fmt: skip


class AutoFreezeTest:
    """AutoFreeze's convergence test (Liu et al. 2021, arXiv 2102.01386): over each interval
    of steps, sum every trainable encoder layer's gradient norm; a layer whose sum changed
    by a fraction at or below the `percentile`-th of the trainable layers' change rates
    since the last interval has converged. Layers freeze bottom-up only (a layer above a
    trainable one keeps training), and the top `keep` layers always train."""

    def __init__(self, num_layers: int, percentile: float, keep: int):
        self.num_layers, self.percentile, self.keep = num_layers, percentile, keep
        self.current: dict[int, float] = {}
        self.previous: dict[int, float] = {}

    def observe(self, model: PreTrainedModel, frozen: int) -> None:
        """After a backward (before clipping): add each trainable layer's gradient norm."""
        for i in range(frozen, self.num_layers):
            grads = [p.grad for p in model.bert.encoder.layer[i].parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads else 0
            self.current[i] = self.current.get(i, 0.0) + float(norm)

    def decide(self, frozen: int) -> tuple[int, dict[str, Any]]:
        """The new frozen depth at the end of an interval, and the record of the decision."""
        rates = {
            i: abs(self.previous[i] - self.current[i]) / max(self.previous[i], 1e-12)
            for i in range(frozen, self.num_layers)
            if i in self.previous and i in self.current
        }
        self.previous, self.current = self.current, {}
        record: dict[str, Any] = {"frozen_before": frozen, "rates": {}}
        if not rates:  # the first interval: nothing to compare with yet
            return frozen, {**record, "frozen_after": frozen, "threshold": None}
        threshold = float(np.percentile(list(rates.values()), self.percentile))
        depth = frozen
        while depth < self.num_layers - self.keep and rates[depth] <= threshold:
            depth += 1
        rounded = {str(i): round(r, 6) for i, r in rates.items()}
        return depth, {**record, "rates": rounded, "threshold": threshold, "frozen_after": depth}
