"""Invariant 3: static masking, example i's mask a function of (seed, split, i) only."""

import dataclasses

import numpy as np
import pytest
from datasets import Dataset, Features, List, Value, concatenate_datasets

from cached_mslt.data.masking import (
    IGNORE_INDEX,
    MaskingSpec,
    apply_static_masking,
    mask_batch,
)

PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
SPEC = MaskingSpec(
    seed=1234,
    mask_prob=0.15,
    mask_token_id=MASK,
    special_ids=(PAD, UNK, CLS, SEP, MASK),
    vocab_size=30522,
)


def packed_tokens(n: int, seq_len: int = 64, seed: int = 0) -> np.ndarray:
    """Random packed rows: [CLS] ... [SEP], with document separators, some [UNK] and padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1000, 30522, size=(n, seq_len), dtype=np.int32)
    tokens[rng.random(tokens.shape) < 0.05] = SEP
    tokens[rng.random(tokens.shape) < 0.01] = UNK
    tokens[:, -8:] = np.where(np.arange(n)[:, None] % 3 == 0, PAD, tokens[:, -8:])
    tokens[:, 0], tokens[:, -1] = CLS, SEP
    return tokens


def as_dataset(tokens: np.ndarray) -> Dataset:
    features = Features({"tokens": List(Value("int32"), length=tokens.shape[1])})
    return Dataset.from_dict({"tokens": tokens}, features=features)


def columns(dataset: Dataset) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in dataset.with_format("numpy")[:].items()}


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return packed_tokens(300)


@pytest.fixture(scope="module")
def reference(tokens) -> dict[str, np.ndarray]:
    return columns(apply_static_masking(as_dataset(tokens), SPEC, "train"))


def test_mask_is_the_same_whatever_the_batch_size(tokens, reference):
    for batch_size in (1, 7, 64):
        masked = apply_static_masking(as_dataset(tokens), SPEC, "train", batch_size=batch_size)
        for name, column in columns(masked).items():
            np.testing.assert_array_equal(column, reference[name])


def test_mask_is_the_same_whatever_the_batch_order(tokens, reference):
    order = np.random.default_rng(1).permutation(len(tokens))
    for batch in np.array_split(order, 9):  # shuffled rows, visited in shuffled batches
        out = mask_batch({"tokens": tokens[batch]}, batch.tolist(), SPEC, split_id=0)
        np.testing.assert_array_equal(out["input_ids"], reference["input_ids"][batch])
        np.testing.assert_array_equal(out["labels"], reference["labels"][batch])


def test_mask_is_the_same_whatever_num_proc(tokens, reference):
    masked = apply_static_masking(as_dataset(tokens), SPEC, "train", num_proc=2)
    for name, column in columns(masked).items():
        np.testing.assert_array_equal(column, reference[name])


def test_mask_is_the_same_whatever_the_number_of_shards(tokens, reference):
    whole = as_dataset(tokens)
    for num_shards in (2, 3, 7):
        parts, offset = [], 0
        for k in range(num_shards):
            shard = whole.shard(num_shards, k, contiguous=True)
            parts.append(apply_static_masking(shard, SPEC, "train", index_offset=offset))
            offset += len(shard)
        for name, column in columns(concatenate_datasets(parts)).items():
            np.testing.assert_array_equal(column, reference[name])


def test_mask_changes_with_seed_split_and_index(tokens, reference):
    def masked_ids(spec, split="train"):
        return columns(apply_static_masking(as_dataset(tokens), spec, split))["input_ids"]

    other_seed = dataclasses.replace(SPEC, seed=SPEC.seed + 1)
    assert (masked_ids(other_seed) != reference["input_ids"]).any(axis=1).all()
    assert (masked_ids(SPEC, "valid") != reference["input_ids"]).any(axis=1).all()
    # The same tokens at two indices (two views of one sequence) get different masks.
    twice = np.stack([tokens[0], tokens[0]])
    out = mask_batch({"tokens": twice}, [0, 1], SPEC, split_id=0)
    assert (out["labels"][0] != out["labels"][1]).any()


def test_special_tokens_are_never_masked_or_used_as_replacements(reference, tokens):
    special = np.isin(tokens, SPEC.special_ids)
    assert special.sum() > 0.05 * tokens.size  # the fixture really has [SEP]/[UNK]/[PAD]
    assert (reference["labels"][special] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(reference["input_ids"][special], tokens[special])
    changed = reference["input_ids"] != tokens
    replaced = reference["input_ids"][changed]
    assert not np.isin(replaced[replaced != MASK], SPEC.special_ids).any()


def test_mask_rate_and_80_10_10_split_on_100k_positions():
    tokens = packed_tokens(6000, seq_len=128, seed=2)
    out = mask_batch({"tokens": tokens}, list(range(len(tokens))), SPEC, split_id=0)
    masked = out["labels"] != IGNORE_INDEX
    maskable = ~np.isin(tokens, SPEC.special_ids)
    assert masked.sum() >= 100_000
    assert masked.sum() / maskable.sum() == pytest.approx(0.15, abs=0.002)
    np.testing.assert_array_equal(out["labels"][masked], tokens[masked])
    inputs = out["input_ids"][masked]
    as_mask = (inputs == MASK).mean()
    kept = (inputs == tokens[masked]).mean()
    assert as_mask == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1, abs=0.01)  # a random draw equal to the original is ~1/30k
    assert 1 - as_mask - kept == pytest.approx(0.1, abs=0.01)
    assert (out["attention_mask"] == 1).all()


def test_every_sequence_has_at_least_one_masked_position():
    # Three maskable tokens: 15% rounds to zero, but each example still gets a loss term.
    tokens = np.array([[CLS, 2000, SEP, 2001, 2002, SEP, PAD, SEP]] * 50, dtype=np.int32)
    out = mask_batch({"tokens": tokens}, list(range(50)), SPEC, split_id=0)
    assert ((out["labels"] != IGNORE_INDEX).sum(axis=1) == 1).all()
