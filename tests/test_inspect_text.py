"""Text back from activations: a row's tokens are exactly its prepared example's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cached_mslt.data.prepare import load_prepared
from cached_mslt.inspect import nearest_rows, row_text
from storage import StaleStoreError, StoreSpec
from tests.inspect_support import write_store

ROWS = 24


@pytest.fixture(scope="module")
def prepared(prepared_dir):
    return load_prepared(prepared_dir)


@pytest.fixture(scope="module")
def tokenizer(prepared):
    return prepared.tokenizer()


def store_of_examples(path, prepared, examples: np.ndarray, hidden=None):
    """A store whose rows are the given prepared examples, in that (shuffled) order."""
    rows = prepared.train[examples.tolist()]
    spec = StoreSpec(
        num_rows=len(examples), seq_len=32, hidden_size=8, dtype="float32", rows_per_chunk=4
    )
    return write_store(
        path,
        spec,
        hidden,
        row_index=torch.as_tensor(examples),
        labels=rows["labels"].long(),
        attention_mask=rows["attention_mask"].long(),
        fingerprint={"data": prepared.manifest["fingerprint"]},
    )


def test_row_text_returns_the_exact_tokens_of_the_prepared_example(tmp_path, prepared, tokenizer):
    # row_index != row, so a lookup by row number instead of row_index cannot pass
    examples = np.random.default_rng(0).permutation(len(prepared.train))[:ROWS]
    store = store_of_examples(tmp_path / "s", prepared, examples)
    shown = []
    for row in (0, 5, ROWS - 1):
        example = prepared.train[int(examples[row])]
        text = row_text(store, row, prepared.train, tokenizer)
        assert text.row == row and text.row_index == examples[row]
        assert text.input_tokens == tokenizer.convert_ids_to_tokens(example["input_ids"].tolist())
        labels = example["labels"].tolist()
        assert text.masked == [label != -100 for label in labels]
        assert text.target_tokens == [
            None if label == -100 else tokenizer.convert_ids_to_tokens(label) for label in labels
        ]
        np.testing.assert_array_equal(text.hidden, store.read_rows(row, row + 1)["hidden"][0])
        shown.append(text)
    # the rows do contain masked positions, marked in the one-line rendering
    assert any("[MASK]" in t.input_tokens for t in shown)
    assert all(t.text().count("[[") == sum(t.masked) for t in shown)


def test_row_text_refuses_a_store_built_from_other_data(tmp_path, prepared, tokenizer):
    examples = np.arange(ROWS)
    store = store_of_examples(tmp_path / "s", prepared, examples)
    shifted = prepared.train.select(range(1, len(prepared.train)))  # example i is now i + 1
    with pytest.raises(StaleStoreError, match="other prepared data"):
        row_text(store, 3, shifted, tokenizer)


@pytest.mark.parametrize("centre", [True, False])
def test_nearest_rows_match_brute_force_cosine(tmp_path, prepared, centre):
    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((ROWS, 32, 8)).astype(np.float32) + 3.0  # a common direction
    hidden[17] = hidden[6] + 0.01 * rng.standard_normal((32, 8))  # row 6's twin
    examples = np.arange(100, 100 + ROWS)
    store = store_of_examples(tmp_path / "s", prepared, examples, hidden)
    found = nearest_rows(store, 6, k=4, centre=centre)
    assert found[0].row == 17 and found[0].row_index == 117 and found[0].cosine > 0.99
    pooled = hidden.astype(np.float64).mean(1)  # packed data: no padding
    if centre:
        pooled -= pooled.mean(0)
    cos = pooled @ pooled[6] / (np.linalg.norm(pooled, axis=1) * np.linalg.norm(pooled[6]))
    cos[6] = -np.inf
    expected = np.argsort(-cos)[:4]
    assert [n.row for n in found] == expected.tolist()
    np.testing.assert_allclose([n.cosine for n in found], cos[expected], rtol=1e-4)
    if not centre:  # the shared offset alone makes every raw cosine high
        assert found[-1].cosine > 0.9
