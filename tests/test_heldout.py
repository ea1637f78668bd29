"""The held-out prose check (docs/levers.md, held-out prose): a checkpoint's MLM loss on text
outside the project's data, beside the unigram loss of the run's training frequencies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertForMaskedLM

from cached_mslt.config import run_args
from cached_mslt.data import SPLIT_IDS, MaskingSpec, load_prepared, mask_batch, prepare_dataset
from cached_mslt.inspect import HeldoutError, heldout_check, heldout_texts
from cached_mslt.inspect.heldout import pack
from cached_mslt.rundir import RunLayout
from cached_mslt.stages import run_all
from tests.conftest import small_run, synthetic_corpus


@pytest.fixture(scope="module")
def trained(prepared_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("heldout") / "run"
    run_all(small_run(prepared_dir, run_dir))
    return RunLayout(run_dir).model_dir(2)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    path = synthetic_corpus(tmp_path_factory.mktemp("texts") / "other.txt", 30, seed=7)
    return heldout_texts([str(path)])


def test_the_reference_is_the_unigram_model_of_the_training_split(trained, prepared_dir, texts):
    result = heldout_check(trained, prepared_dir, texts, seq_len=32)
    prepared = load_prepared(prepared_dir)
    tokenizer = prepared.tokenizer()
    train = prepared.train.with_format("numpy")[:]
    tokens = np.where(train["labels"] >= 0, train["labels"], train["input_ids"])
    counts = np.bincount(tokens.ravel(), minlength=len(tokenizer)).astype(float)
    counts[tokenizer.all_special_ids] = 0
    log_p = np.log((counts + 1) / (counts.sum() + len(counts)))
    spec = MaskingSpec.for_tokenizer(tokenizer, 1234, 0.15)
    rows = pack(texts, tokenizer, 32)
    labels = mask_batch({"tokens": rows}, range(len(rows)), spec, SPLIT_IDS["valid"])["labels"]
    assert result.unigram_loss == pytest.approx(-log_p[labels[labels >= 0]].mean(), rel=1e-9)
    assert result.masked == int((labels >= 0).sum()) and result.sequences == len(rows)


def test_the_loss_is_the_models_cross_entropy_on_every_masked_token(trained, prepared_dir, texts):
    result = heldout_check(trained, prepared_dir, texts, seq_len=32, batch_rows=5)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    rows = pack(texts, tokenizer, 32)
    spec = MaskingSpec.for_tokenizer(tokenizer, 1234, 0.15)
    masked = mask_batch({"tokens": rows}, range(len(rows)), spec, SPLIT_IDS["valid"])
    model = BertForMaskedLM.from_pretrained(trained).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(masked["input_ids"], dtype=torch.long)).logits
    labels = torch.as_tensor(masked["labels"], dtype=torch.long)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    assert result.loss == pytest.approx(float(expected), rel=1e-5)


def test_stage_directions_are_not_prose(tmp_path):
    (tmp_path / "speech.txt").write_text("Thank you. (Applause.) We will [Laughter] go on.\n")
    assert heldout_texts([str(tmp_path)]) == ["Thank you. We will go on."]


def test_a_checkpoint_of_another_vocabulary_is_refused(trained, tmp_path, texts):
    corpus = synthetic_corpus(tmp_path / "c.txt", 40, seed=3)
    other = prepare_dataset(
        run_args(
            "tiny",
            corpus=[str(corpus)],
            prepared_dir=str(tmp_path / "p"),
            seq_len=32,
            num_proc=1,
            valid_fraction=0.1,
            views=1,
            vocab_size=150,
        )
    )
    with pytest.raises(HeldoutError, match="another vocabulary.*--prepared_dir"):
        heldout_check(trained, other, texts, seq_len=32)
