"""Fine-tuning: an MLM checkpoint's encoder carries over, a short run writes its metrics and
summary, and the metric code scores a majority-class model at exactly the majority share."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForMaskedLM, DataCollatorWithPadding
from transformers.modeling_outputs import SequenceClassifierOutput

from cached_mslt.config import ConfigError
from cached_mslt.data.tokenizer import load_tokenizer
from cached_mslt.evaluation import (
    FinetuneArgs,
    FinetuneError,
    finetune,
    linear_probe,
)
from cached_mslt.evaluation.checkpoint import load_classifier
from cached_mslt.evaluation.data import tokenize_task
from cached_mslt.evaluation.finetune import evaluate_classifier
from cached_mslt.evaluation.probe import PROBE_FILE
from cached_mslt.evaluation.report import classification_metrics
from cached_mslt.evaluation.tasks import TaskOverlapWarning, prepare_task

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random BertForMaskedLM saved the way the trainer saves its stages."""
    path = tmp_path_factory.mktemp("ckpt") / "stage-1"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertForMaskedLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    """A small user task that a model can learn in a few steps: the label is in the words."""
    rng = np.random.default_rng(0)
    words = {"pos": ["great", "superb", "lovely"], "neg": ["awful", "dreadful", "boring"]}
    rows = []
    for i in range(120):
        label = "pos" if i % 2 else "neg"
        rows.append(f"film {i} was {rng.choice(words[label])},{label}\n")
    path = tmp_path_factory.mktemp("data") / "toy.csv"
    path.write_text("text,label\n" + "".join(rows))
    return path


def quick_args(tmp_path: Path, **overrides) -> FinetuneArgs:
    args = FinetuneArgs(
        task_dir=str(tmp_path / "tasks"),
        output_dir=str(tmp_path / "out"),
        seeds=[0, 1],
        finetune_epochs=2,
        finetune_batch_size=16,
        finetune_lr=1e-3,
        finetune_log_every=2,
    )
    return dataclasses.replace(args, **overrides)


def test_classifier_keeps_the_encoder_and_adds_a_new_head(checkpoint, caplog):
    mlm = BertForMaskedLM.from_pretrained(checkpoint)
    with caplog.at_level("INFO"):
        Accelerator()  # the accelerate logger needs its state
        clf = load_classifier(checkpoint, num_labels=3)
    for name, value in mlm.bert.state_dict().items():
        assert torch.equal(clf.bert.state_dict()[name], value), name
    assert clf.classifier.out_features == 3
    assert "randomly initialised as expected" in caplog.text and "LOAD REPORT" not in caplog.text


def test_checkpoint_missing_encoder_weights_is_refused(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    BertForMaskedLM.from_pretrained(checkpoint).save_pretrained(broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the weights hold 2 layers: layer 2 would be random
    (broken / "config.json").write_text(json.dumps(config))
    Accelerator()
    with pytest.raises(FinetuneError, match="lacks encoder weights"):
        load_classifier(broken, num_labels=2)


def test_finetune_runs_and_writes_metrics(checkpoint, task_file, tmp_path):
    result = finetune(checkpoint, str(task_file), quick_args(tmp_path))
    out = tmp_path / "out" / "toy"
    assert (
        json.loads((out / "finetune_results.json").read_text())["accuracy_mean"]
        == result["accuracy_mean"]
    )
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    assert result["sizes"] == {"train": 96, "validation": 12, "test": 12}
    assert result["accuracy_std"] == pytest.approx(
        np.std([r["test_accuracy"] for r in result["runs"]], ddof=1)
    )
    for key in ("accuracy_mean", "macro_f1_mean", "majority_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    records = [
        json.loads(line) for line in (out / "finetune_metrics.jsonl").read_text().splitlines()
    ]
    assert any("train_loss" in r and "lr" in r for r in records)
    assert (
        sum("valid_accuracy" in r and "split" not in r for r in records) >= 2
    )  # one per epoch and seed
    assert [r["seed"] for r in records if r.get("split") == "test"] == [0, 1]


def test_finetune_learns_a_task_the_words_decide(checkpoint, task_file, tmp_path):
    # A random tiny encoder sits on a plateau for ~50 steps, then separates the classes; the
    # metrics prove gradients reach the encoder and the best epoch is the one tested.
    args = quick_args(tmp_path, seeds=[0], finetune_epochs=12, early_stopping_patience=12)
    result = finetune(checkpoint, str(task_file), args)
    assert result["accuracy_mean"] >= 0.9 > result["majority_accuracy"]


def test_linear_probe_reads_the_frozen_encoder_and_is_deterministic(
    checkpoint, task_file, tmp_path
):
    # Mean-pooled features of even a random encoder keep which words a text has, and here
    # the words decide the label: a linear reader must find it, the same way every time.
    args = quick_args(tmp_path)
    first = linear_probe(checkpoint, str(task_file), args)
    assert linear_probe(checkpoint, str(task_file), args) == first
    assert first["test_accuracy"] >= 0.9 > first["majority_accuracy"]
    assert first["sizes"] == {"train": 96, "validation": 12, "test": 12}
    assert json.loads((tmp_path / "out" / "toy" / PROBE_FILE).read_text()) == first
    with pytest.raises(FinetuneError, match="not a checkpoint"):
        linear_probe(tmp_path / "out", str(task_file), args)


def test_task_text_in_the_runs_pretraining_corpus_is_warned_about(checkpoint, task_file, tmp_path):
    # The trainer's layout: runs/<preset>/config.json holds --corpus, the model sits in
    # runs/<preset>/stage-K/model; the check finds the corpus without being told.
    leaked = task_file.read_text().splitlines()[5].rsplit(",", 1)[0]
    corpus = tmp_path / "my_corpus.txt"
    corpus.write_text(f"A document about something else entirely.\n\n{leaked}\n")
    run = tmp_path / "runs" / "tiny"
    BertForMaskedLM.from_pretrained(checkpoint).save_pretrained(run / "stage-1" / "model")
    (run / "config.json").write_text(json.dumps({"data": {"corpus": [str(corpus)]}}))
    args = quick_args(tmp_path, seeds=[0], finetune_epochs=1)
    with pytest.warns(TaskOverlapWarning, match="1 of 120 examples of task toy"):
        result = finetune(run / "stage-1" / "model", str(task_file), args)
    assert sum(result["pretraining_overlap"].values()) == 1


def test_pipeline_prints_a_results_table(checkpoint, task_file, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "finetune_pipeline", REPO / "pipelines" / "finetune.py"
    )
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    argv = ["--checkpoint", str(checkpoint), "--task", str(task_file), "--seeds", "3"]
    argv += ["--task_dir", str(tmp_path / "tasks"), "--finetune_epochs", "1"]
    argv += ["--evaluation", "finetune", "probe"]
    pipeline.main(argv)
    table = capsys.readouterr().out
    assert (
        "| task | test examples | seeds | accuracy (%) |" in table and "| toy | 12 | 1 |" in table
    )
    assert "| task | linear probe accuracy (%) |" in table
    for name in ("finetune_results.json", PROBE_FILE):  # the default output dir
        assert (checkpoint / "finetune" / "toy" / name).is_file()


class MajorityClassModel(nn.Module):
    def __init__(self, label: int, num_labels: int):
        super().__init__()
        self.label, self.num_labels = label, num_labels

    def forward(self, input_ids: torch.Tensor, **_) -> SequenceClassifierOutput:
        logits = torch.zeros(len(input_ids), self.num_labels)
        logits[:, self.label] = 1.0
        return SequenceClassifierOutput(logits=logits)


def test_majority_class_model_scores_the_majority_share(tmp_path):
    task = prepare_task("bbc", tmp_path, verbose=False)
    tokenizer = load_tokenizer()
    data = tokenize_task(task, tokenizer, max_seq_len=16)
    counts = np.bincount(task.splits["test"]["label"])
    majority, n = int(counts.argmax()), int(counts.sum())
    accelerator = Accelerator()
    dl = accelerator.prepare(
        DataLoader(data["test"], batch_size=50, collate_fn=DataCollatorWithPadding(tokenizer))
    )
    metrics = evaluate_classifier(
        MajorityClassModel(majority, task.num_labels), dl, accelerator, task.num_labels
    )
    assert metrics["accuracy"] == counts.max() / n  # 51 sports articles of 213
    # F1 is 2*51/(213+51) for the majority class and 0 for the four others.
    assert metrics["macro_f1"] == pytest.approx(2 * counts.max() / (n + counts.max()) / 5)


def test_bad_finetune_args_are_refused():
    with pytest.raises(ConfigError, match="finetune_epochs must be at least 1"):
        FinetuneArgs(finetune_epochs=0)
    with pytest.raises(ConfigError, match="at least one seed"):
        FinetuneArgs(seeds=[])
    with pytest.raises(ConfigError, match="finetune and/or probe"):
        FinetuneArgs(evaluation=["probing"])


def test_macro_f1_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    preds = np.array([0, 0, 1, 1, 2, 2])
    # class 0: P=1, R=2/3 -> 0.8; class 1: P=1/2, R=1/2 -> 0.5; class 2: P=1/2, R=1 -> 2/3.
    got = classification_metrics(preds, labels, num_labels=4)  # class 3 absent: not averaged
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
