"""Static MLM masking: example i's mask is a pure function of (seed, split, i).

Each example gets its own generator, `numpy.random.default_rng([seed, split_id, i])`,
so the mask cannot depend on batch size, batch order, `num_proc` or sharding: the
cached activations of example i are valid for as long as the data is. As in BERT's
`create_pretraining_data.py`, a fixed share of each sequence's maskable positions is
chosen (at least one, so every example has a loss term); of those 80% become [MASK],
10% a random token and 10% stay unchanged. Special tokens are never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset, Features, List, Value
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label torch's cross-entropy skips
SPLIT_IDS = {"train": 0, "valid": 1}


@dataclass(frozen=True)
class MaskingSpec:
    seed: int
    mask_prob: float
    mask_token_id: int
    special_ids: tuple[int, ...]  # never masked, never drawn as random replacements
    vocab_size: int

    @classmethod
    def for_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, seed: int, mask_prob: float
    ) -> MaskingSpec:
        return cls(
            seed=seed,
            mask_prob=mask_prob,
            mask_token_id=tokenizer.mask_token_id,
            special_ids=tuple(sorted(tokenizer.all_special_ids)),
            vocab_size=len(tokenizer),
        )


def mask_sequence(
    tokens: np.ndarray, index: int, spec: MaskingSpec, split_id: int, replacements: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mask one sequence of token ids; returns (input_ids, labels)."""
    rng = np.random.default_rng([spec.seed, split_id, index])
    maskable = np.flatnonzero(~np.isin(tokens, spec.special_ids))
    if maskable.size == 0:
        raise ValueError(f"example {index} holds only special tokens; nothing to mask")
    count = max(1, round(spec.mask_prob * maskable.size))
    chosen = rng.choice(maskable, size=count, replace=False)
    action = rng.random(count)
    labels = np.full_like(tokens, IGNORE_INDEX)
    labels[chosen] = tokens[chosen]
    input_ids = tokens.copy()
    input_ids[chosen[action < 0.8]] = spec.mask_token_id
    randomised = chosen[(action >= 0.8) & (action < 0.9)]
    input_ids[randomised] = rng.choice(replacements, size=randomised.size)
    return input_ids, labels


def mask_batch(
    batch: dict[str, list[Any]],
    indices: list[int],
    spec: MaskingSpec,
    split_id: int,
    index_offset: int = 0,
) -> dict[str, np.ndarray]:
    """`datasets.map(batched=True, with_indices=True)` function: `tokens` -> MLM columns."""
    replacements = np.setdiff1d(np.arange(spec.vocab_size, dtype=np.int32), spec.special_ids)
    tokens = np.asarray(batch["tokens"], dtype=np.int32)
    input_ids, labels = np.empty_like(tokens), np.empty_like(tokens)
    for row, index in enumerate(indices):
        input_ids[row], labels[row] = mask_sequence(
            tokens[row], index_offset + index, spec, split_id, replacements
        )
    # Packed sequences have no padding, so every position attends.
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": np.ones_like(tokens, np.int8),
    }


def apply_static_masking(
    dataset: Dataset,
    spec: MaskingSpec,
    split: str,
    num_proc: int | None = None,
    index_offset: int = 0,
    batch_size: int = 1000,
) -> Dataset:
    """Replace `tokens` by `input_ids`, `labels`, `attention_mask`.

    `index_offset` is the global index of this dataset's first row, so a shard masked on
    its own gets exactly the rows the whole dataset would have.
    """
    seq_len = len(dataset[0]["tokens"])
    features = dataset.features.copy()
    del features["tokens"]
    features["input_ids"] = List(Value("int32"), length=seq_len)
    features["labels"] = List(Value("int32"), length=seq_len)
    features["attention_mask"] = List(Value("int8"), length=seq_len)
    return dataset.map(
        mask_batch,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        fn_kwargs={"spec": spec, "split_id": SPLIT_IDS[split], "index_offset": index_offset},
        remove_columns=["tokens"],
        features=Features(features),
        num_proc=num_proc,
        desc=f"Masking {split}",
    )
