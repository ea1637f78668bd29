"""Text back from activations: a store row's tokens (and which were masked), and the
rows whose mean-pooled hidden states are nearest to a given row's.

`row_index` maps each store row to its example in the prepared training split, whose
`input_ids` are the masked input the frozen bottom saw and whose `labels` hold the
original token at each masked position (-100 elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from cached_mslt.inspect.api import block_ranges, iter_blocks, single_threaded_compute
from cached_mslt.models import mean_pool
from storage import ActivationStore, StaleStoreError

IGNORE_INDEX = -100
SHOWN_DIMS = 4  # hidden values printed per token beside its text


@dataclass
class RowText:
    """One store row in words: the input as the model saw it, beside its vectors."""

    row: int
    row_index: int
    input_tokens: list[str]  # masked input ([MASK], a random token, or kept)
    target_tokens: list[str | None]  # original token at masked positions, else None
    attention_mask: list[bool]
    hidden: np.ndarray  # [T, H] float32

    @property
    def masked(self) -> list[bool]:
        return [t is not None for t in self.target_tokens]

    def text(self) -> str:
        """The input on one line; a masked position reads [[original->input]]."""
        words = [
            tok if tgt is None else f"[[{tgt}->{tok}]]"
            for tok, tgt, real in zip(self.input_tokens, self.target_tokens, self.attention_mask)
            if real
        ]
        return " ".join(words)

    def table(self, max_tokens: int | None = None) -> str:
        """Position, token, target, norm and the first hidden values, one line per token."""
        norms = np.linalg.norm(self.hidden, axis=-1)
        lines = [f"{'pos':>4}  {'input':<14}{'target':<14}{'norm':>8}  h[:{SHOWN_DIMS}]"]
        for t, (tok, tgt) in enumerate(zip(self.input_tokens, self.target_tokens)):
            if max_tokens is not None and t >= max_tokens:
                lines.append(f"  ... {len(self.input_tokens) - t} more tokens")
                break
            values = " ".join(f"{v:+.3f}" for v in self.hidden[t, :SHOWN_DIMS])
            pad = "" if self.attention_mask[t] else " (padding)"
            lines.append(f"{t:>4}  {tok:<14}{tgt or '':<14}{norms[t]:>8.2f}  {values}{pad}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "row": self.row,
            "row_index": self.row_index,
            "text": self.text(),
            "input_tokens": self.input_tokens,
            "target_tokens": self.target_tokens,
            "attention_mask": self.attention_mask,
            "norms": np.linalg.norm(self.hidden, axis=-1).round(4).tolist(),
        }


def prepared_example(prepared_train, index: int) -> dict[str, torch.Tensor]:
    example = prepared_train[int(index)]
    return {k: torch.as_tensor(example[k]) for k in ("input_ids", "labels", "attention_mask")}


def row_text(
    store: ActivationStore, row: int, prepared_train, tokenizer: PreTrainedTokenizerBase
) -> RowText:
    """Store row `row` as text. Refuses (StaleStoreError) if the store's labels or mask for
    that row are not the prepared example's: then the store was built from other data
    and its row_index points at the wrong text."""
    if not 0 <= row < store.spec.num_rows:
        raise IndexError(f"row {row} outside [0, {store.spec.num_rows}) of {store.url}")
    # Reading one row decodes its whole chunk anyway; read just that chunk.
    rows = store.read_rows(row, row + 1)
    index = int(rows["row_index"][0])
    example = prepared_example(prepared_train, index)
    labels = example["labels"].long()
    if not torch.equal(labels, rows["labels"][0]) or not torch.equal(
        example["attention_mask"].long(), rows["attention_mask"][0]
    ):
        raise StaleStoreError(
            f"{store.url} row {row} claims prepared example {index}, but its labels or mask "
            "differ from that example's: the store was built from other prepared data. "
            "Point --prepared at the data the store was built from, or rebuild the store"
        )
    ids = example["input_ids"].tolist()
    targets = [
        None if lab == IGNORE_INDEX else tokenizer.convert_ids_to_tokens(lab)
        for lab in labels.tolist()
    ]
    return RowText(
        row=row,
        row_index=index,
        input_tokens=tokenizer.convert_ids_to_tokens(ids),
        target_tokens=targets,
        attention_mask=example["attention_mask"].bool().tolist(),
        hidden=rows["hidden"][0].float().numpy(),
    )


def original_text(prepared_train, index: int, tokenizer: PreTrainedTokenizerBase) -> str:
    """The example's text with masked positions restored to their original tokens."""
    example = prepared_example(prepared_train, index)
    ids = torch.where(example["labels"] != IGNORE_INDEX, example["labels"], example["input_ids"])
    return tokenizer.decode(ids[example["attention_mask"].bool()], skip_special_tokens=True)


@dataclass
class Neighbour:
    row: int
    row_index: int
    cosine: float


def nearest_rows(
    store: ActivationStore, row: int, k: int = 5, rows: int | None = None, *, centre: bool = True
) -> list[Neighbour]:
    """The `k` rows (other than `row`) whose mean-pooled hidden states have the highest
    cosine with `row`'s, over the whole store or a sample; memory O(k).

    `centre` subtracts the mean pooled vector first (one more streaming pass): hidden
    states share a large common direction (anisotropy), which puts every raw cosine near
    1 and lets that direction, not the content, decide the ranking.
    """
    ranges = block_ranges(store, rows)
    with single_threaded_compute():
        offset = _mean_pooled(store, ranges) if centre else None
        mine = store.read_rows(row, row + 1)
        query = _unit(mean_pool(mine["hidden"], mine["attention_mask"]), offset)[0]
        return _top_k(store, ranges, query, offset, row, k)


def _unit(pooled: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    if offset is not None:
        pooled = pooled - offset
    return pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _mean_pooled(store: ActivationStore, ranges: list[tuple[int, int]]) -> torch.Tensor:
    total, count = torch.zeros(store.spec.hidden_size, dtype=torch.float64), 0
    for block in iter_blocks(store, ranges):
        total += mean_pool(block["hidden"], block["attention_mask"]).double().sum(0)
        count += len(block["row_index"])
    return (total / count).float()


def _top_k(
    store: ActivationStore,
    ranges: list[tuple[int, int]],
    query: torch.Tensor,
    offset: torch.Tensor | None,
    row: int,
    k: int,
) -> list[Neighbour]:
    best_cos = torch.empty(0)
    best_row = torch.empty(0, dtype=torch.long)
    best_index = torch.empty(0, dtype=torch.long)
    for (start, _), block in zip(ranges, iter_blocks(store, ranges)):
        cos = _unit(mean_pool(block["hidden"], block["attention_mask"]), offset) @ query
        ids = torch.arange(start, start + len(cos))
        cos[ids == row] = -float("inf")  # the row itself is not its own neighbour
        best_cos = torch.cat([best_cos, cos])
        best_row = torch.cat([best_row, ids])
        best_index = torch.cat([best_index, block["row_index"]])
        top = torch.topk(best_cos, min(k, len(best_cos))).indices
        best_cos, best_row, best_index = best_cos[top], best_row[top], best_index[top]
    return [
        Neighbour(int(r), int(i), float(c))
        for r, i, c in zip(best_row, best_index, best_cos)
        if c > -float("inf")
    ]
