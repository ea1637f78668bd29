"""Fine-tuning from the cache (docs/evaluation.md): the frozen bottom's outputs over a task
are built once into stores that every seed and learning rate trains from, a stale store is
refused with a fix that works, a top trained from the store equals the same top trained
live (bitwise in float32), progressive freezing freezes bottom-up and extends the store,
and the probe reads the store instead of running the bottom again."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from transformers import BertConfig, BertForMaskedLM, DataCollatorWithPadding

import cached_mslt.evaluation.task_store as task_store_module
from cached_mslt.evaluation import FinetuneArgs, FinetuneError, StoreLocation, finetune
from cached_mslt.evaluation.checkpoint import checkpoint_tokenizer, load_classifier
from cached_mslt.evaluation.data import task_from_args, tokenize_task
from cached_mslt.evaluation.finetune import FINETUNE_METRICS_FILE, _optimizer
from cached_mslt.evaluation.frozen_top import (
    AutoFreezeTest,
    ClassifierTop,
    classifier_module,
    freeze_to,
    frozen_rows,
)
from cached_mslt.evaluation.probe import encoder_features, stored_features
from cached_mslt.evaluation.task_store import ROW_LENGTH_MULTIPLE, SPLITS
from cached_mslt.models import first_position_layer, layer_mask, run_layers
from storage import ActivationStore

REPO = Path(__file__).resolve().parents[1]
LAYERS = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "stage-2"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertForMaskedLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    """Rows of several lengths (so batches hold padding), 8 to 26 tokens (so they fall in
    two computed lengths: 16, and the store's 26), the label in the words."""
    rng = np.random.default_rng(0)
    words = {"pos": ["great", "superb", "lovely"], "neg": ["awful", "dreadful", "boring"]}
    rows = []
    for i in range(120):
        label = "pos" if i % 2 else "neg"
        rows.append(f"film {i} was {'really ' * (i % 19)}{rng.choice(words[label])},{label}\n")
    path = tmp_path_factory.mktemp("data") / "toy.csv"
    path.write_text("text,label\n" + "".join(rows))
    return path


def frozen_args(tmp_path: Path, **overrides) -> FinetuneArgs:
    args = FinetuneArgs(
        task_dir=str(tmp_path / "tasks"),
        output_dir=str(tmp_path / "out"),
        seeds=[0],
        finetune_epochs=2,
        finetune_batch_size=16,
        finetune_lr=[1e-3],
        finetune_log_every=1,
        freeze_layers=2,
        overlap_corpus=["none"],
    )
    return dataclasses.replace(args, **overrides)


def metrics(tmp_path: Path) -> list[dict]:
    lines = (tmp_path / "out" / "toy" / FINETUNE_METRICS_FILE).read_text().splitlines()
    drop = ("seconds", "cpu_s")  # clocks differ run to run
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines]


def count_builds(monkeypatch) -> list[bool]:
    """Spy on the store builds: one entry per split store, True if it was reused."""
    calls: list[bool] = []
    real = task_store_module.build_cache

    def spy(*args, **kwargs):
        store, stats = real(*args, **kwargs)
        calls.append(stats["reused"])
        return store, stats

    monkeypatch.setattr(task_store_module, "build_cache", spy)
    return calls


def test_store_is_built_once_for_every_seed_and_learning_rate_then_reused(
    checkpoint, task_file, tmp_path, monkeypatch
):
    builds = count_builds(monkeypatch)
    args = frozen_args(tmp_path, seeds=[0, 1], finetune_lr=[1e-3, 3e-3], finetune_epochs=1)
    result = finetune(checkpoint, str(task_file), args)
    assert builds == [False, False, False]  # train, validation, test: built once
    assert [(r["lr"], r["seed"]) for r in result["runs"]] == [
        (1e-3, 0),
        (1e-3, 1),
        (3e-3, 0),
        (3e-3, 1),
    ]
    assert [s["lr"] for s in result["sweep"]] == [1e-3, 3e-3]
    assert result["frozen_bottom"]["reused"] is False and result["frozen_bottom"]["rows"] == 120
    store = ActivationStore.open(result["frozen_bottom"]["urls"]["train"])
    assert store.fingerprint["frozen_layers"] == "2" and store.spec.num_rows == 96
    labels = store.read_rows(0, 96)["labels"]
    assert (labels[:, 1:] == -100).all() and set(labels[:, 0].tolist()) == {0, 1}

    builds.clear()
    again = finetune(checkpoint, str(task_file), dataclasses.replace(args, seeds=[2]))
    assert builds == [True, True, True] and again["frozen_bottom"]["reused"] is True


def test_a_stale_store_is_refused_with_a_fix_that_works(checkpoint, task_file, tmp_path):
    finetune(checkpoint, str(task_file), frozen_args(tmp_path, finetune_epochs=1))
    retrained = tmp_path / "retrained"
    model = BertForMaskedLM.from_pretrained(checkpoint)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.bias.add_(0.01)  # the frozen bottom changed
    model.save_pretrained(retrained)
    with pytest.raises(FinetuneError, match="stale.*--overwrite_cache") as refused:
        finetune(retrained, str(task_file), frozen_args(tmp_path, finetune_epochs=1))
    assert "weights" in str(refused.value)
    # The fix the message names: --overwrite_cache on the command line.
    spec = importlib.util.spec_from_file_location("finetune_cli", REPO / "pipelines/finetune.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = str(tmp_path / "out")
    argv = ["--checkpoint", str(retrained), "--task", str(task_file), "--seeds", "0"]
    argv += ["--task_dir", str(tmp_path / "tasks"), "--output_dir", out, "--freeze_layers", "2"]
    argv += ["--finetune_epochs", "1", "--overlap_corpus", "none", "--overwrite_cache"]
    (result,) = cli.main(argv)
    assert result["frozen_bottom"]["reused"] is False


def test_top_trained_from_the_store_equals_the_top_trained_live_bitwise(
    checkpoint, task_file, tmp_path
):
    """Design invariant 1 for classification: every logged loss, accuracy and the test
    result of a top trained from a float32 store equal those of the same top over the
    frozen bottom run live; a bfloat16 store is read back rounded and differs."""
    runs = {}
    for name, overrides in {
        "store": {},
        "live": {"freeze_cache": False},
        "bf16": {"freeze_cache_dtype": "bfloat16", "output_dir": str(tmp_path / "bf16")},
    }.items():
        result = finetune(checkpoint, str(task_file), frozen_args(tmp_path, **overrides))
        runs[name] = metrics(tmp_path) if name != "bf16" else result
    assert runs["store"] == runs["live"]
    assert any("train_loss" in r for r in runs["store"])
    store_test = [r for r in runs["store"] if r.get("split") == "test"][0]["test_loss"]
    assert runs["bf16"]["runs"][0]["test_loss"] != store_test


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_first_position_layer_equals_the_whole_layer_at_position_0(attention):
    """The [CLS]-only last layer: position 0's output, and every parameter's gradient
    through it, equal the whole layer's up to float rounding, padded rows included."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForMaskedLM(config)
    model.set_attn_implementation(attention)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, 5:], attention_mask[2, 2:] = 0, 0
    for pads in (attention_mask, torch.ones_like(attention_mask)):  # no padding: mask None
        hidden = model.bert.embeddings(input_ids=torch.randint(1, 50, (3, 9))).detach()
        mask = layer_mask(model, hidden, pads)
        layer = model.bert.encoder.layer[0]
        outputs, grads = [], []
        for whole in (True, False):
            layer.zero_grad()
            first = layer(hidden, mask)[:, :1] if whole else None
            out = first_position_layer(layer, hidden, mask) if first is None else first
            out.square().sum().backward()
            outputs.append(out.detach())
            grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
        assert outputs[1].shape == (3, 1, 32)
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_full_fine_tuning_top_equals_the_classifiers_own_forward(checkpoint):
    """Full fine-tuning trains `ClassifierTop(model, 0)`: its loss, logits and gradients
    are BertForSequenceClassification's own (up to the last layer's rounding)."""
    Accelerator()
    torch.manual_seed(0)
    model = load_classifier(checkpoint, num_labels=2).eval()
    top = classifier_module(model)
    assert isinstance(top, ClassifierTop) and top.frozen == 0
    batch = {
        "input_ids": torch.randint(1000, 2000, (4, 11)),
        "attention_mask": torch.tensor([[1] * 11, [1] * 7 + [0] * 4, [1] * 3 + [0] * 8, [1] * 11]),
        "token_type_ids": torch.zeros(4, 11, dtype=torch.long),
        "labels": torch.tensor([0, 1, 1, 0]),
    }
    results = []
    for forward in (model, top):
        model.zero_grad()
        out = forward(**batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), out.logits.detach(), grads))
    (loss, logits, grads), (top_loss, top_logits, top_grads) = results
    torch.testing.assert_close(top_logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(top_loss, loss, rtol=1e-5, atol=1e-6)
    assert top_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(top_grads[name], grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_each_row_is_computed_at_its_own_length_whatever_its_batch(checkpoint, attention):
    """A task store's rows (and the live bottom's) are computed at their own length rounded
    up to ROW_LENGTH_MULTIPLE: a row's output is bitwise the same alone, in any batch and at
    any padding, zero beyond its length, and equal to the row at the whole padding up to
    sdpa's rounding (docs/library-facts.md)."""
    model = load_classifier(checkpoint, num_labels=2).eval()
    model.set_attn_implementation(attention)
    torch.manual_seed(0)
    lengths = [3, 16, 17, 40, 75, 31, 9, 64]
    ids = torch.randint(1000, 2000, (len(lengths), 80))
    mask = (torch.arange(80)[None] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        batch = frozen_rows(model, mask, 2, ids)
        whole = run_layers(model, model.bert.embeddings(input_ids=ids), mask, 0, 2)
        for i, n in enumerate(lengths):
            computed = -(-n // ROW_LENGTH_MULTIPLE) * ROW_LENGTH_MULTIPLE
            alone = frozen_rows(model, mask[i : i + 1, :computed], 2, ids[i : i + 1, :computed])
            assert torch.equal(alone[0], batch[i, :computed])
            assert not batch[i, computed:].any()
            torch.testing.assert_close(batch[i, :n], whole[i, :n], rtol=0, atol=1e-5)
        shuffled = torch.tensor([7, 2, 0, 5])
        again = frozen_rows(model, mask[shuffled], 2, ids[shuffled])
        assert torch.equal(again, batch[shuffled])


def test_frozen_bottom_is_out_of_the_optimizer_and_stays_in_eval_mode(checkpoint):
    Accelerator()
    model = load_classifier(checkpoint, num_labels=2)
    freeze_to(model, 2)
    top = ClassifierTop(model, 2)
    top.train()
    optimizer, _ = _optimizer(top, frozen_args(Path(".")), 10, 1e-3)
    handed = {id(p) for g in optimizer.param_groups for p in g["params"]}
    bottom = [model.bert.embeddings, *model.bert.encoder.layer[:2]]
    assert all(not m.training for m in bottom) and model.bert.encoder.layer[2].training
    assert not handed & {id(p) for m in bottom for p in m.parameters()}
    assert {id(p) for p in model.bert.encoder.layer[2].parameters()} <= handed


def test_autofreeze_test_freezes_converged_layers_bottom_up_and_keeps_the_top():
    test = AutoFreezeTest(num_layers=4, percentile=50, keep=1)
    test.current = {1: 10.0, 2: 10.0, 3: 10.0}
    assert test.decide(1) == (
        1,
        {"frozen_before": 1, "rates": {}, "frozen_after": 1, "threshold": None},
    )
    # change rates: layer 1 0.01, layer 2 0.5, layer 3 0.02 -> median 0.02
    test.current = {1: 10.1, 2: 15.0, 3: 10.2}
    depth, record = test.decide(1)
    assert depth == 2 and record["threshold"] == pytest.approx(0.02)
    # layer 3 converged but layer 2 above it did not: nothing freezes out of order
    test.current = {2: 30.0, 3: 10.2}
    assert test.decide(2)[0] == 2
    # everything converged: all but the top `keep` layers freeze
    test.current = {2: 30.0, 3: 10.2}
    assert test.decide(2)[0] == 3


@pytest.mark.parametrize("start", [0, 1])
def test_progressive_freezing_extends_the_store_and_records_each_decision(
    checkpoint, task_file, tmp_path, start
):
    # percentile 100: every rate is at or below the largest, so each test freezes all it
    # may; keep 1 stops it below the top layer. From 0 the first freeze builds the store
    # from token ids, from 1 it extends the K = 1 store; either way the batch the loader
    # read ahead before a freeze must reach the new top at its own depth.
    args = frozen_args(
        tmp_path,
        freeze_layers=start,
        freeze="progressive",
        freeze_interval=2,
        freeze_percentile=100,
    )
    result = finetune(checkpoint, str(task_file), args)
    (run,) = result["runs"]
    decisions = run["freeze_decisions"]
    assert [d["step"] for d in decisions] == [2, 4, 6, 8, 10, 12]
    assert decisions[0]["frozen_after"] == start and decisions[1]["frozen_after"] == LAYERS - 1
    assert run["final_depth"] == LAYERS - 1 and "AutoFreeze" in run["freeze_rule"]
    logged = [r["freeze_decision"] for r in metrics(tmp_path) if "freeze_decision" in r]
    assert logged == decisions
    extended = tmp_path / "out" / "cache" / "toy" / "run-toy-lr-0.001-seed-0"
    built = ActivationStore.open(extended / f"frozen-{LAYERS - 1}" / "train").attrs["built"]
    if start == 0:
        assert built == "full"
    else:
        assert built.startswith("incremental from") and "frozen-1/train (layers 1..3)" in built


def test_a_batch_read_before_a_freeze_reaches_the_new_top_as_the_deeper_store_holds_it(
    checkpoint, task_file, tmp_path
):
    """The prepared loader collates one batch ahead: a batch at depth 1 given to the top
    at depth 3 runs layers 1..2 (frozen) first, and equals the same rows read at depth 3."""
    result = finetune(checkpoint, str(task_file), frozen_args(tmp_path, freeze_layers=1))
    Accelerator()
    model = load_classifier(checkpoint, num_labels=2).eval()
    shallow = ActivationStore.open(result["frozen_bottom"]["urls"]["train"]).read_rows(0, 8)
    mask = shallow["attention_mask"]
    deep = run_layers(model, shallow["hidden"], mask, 1, 3)
    top = ClassifierTop(model, 3)
    labels = shallow["labels"][:, 0]
    early = top(labels, mask, hidden_states=shallow["hidden"], depth=1).logits
    assert torch.equal(early, top(labels, mask, hidden_states=deep, depth=3).logits)


def test_probe_reads_the_store_instead_of_running_the_bottom(
    checkpoint, task_file, tmp_path, monkeypatch
):
    args = frozen_args(tmp_path, freeze_layers=3)
    finetune(checkpoint, str(task_file), dataclasses.replace(args, finetune_epochs=1))
    import cached_mslt.stages.cache as cache_module

    def no_bottom(*a, **k):
        raise AssertionError("the probe ran the frozen bottom instead of reading its store")

    monkeypatch.setattr(cache_module, "bottom_forward", no_bottom)
    tokenizer = checkpoint_tokenizer(checkpoint)
    task = task_from_args(str(task_file), args, verbose=False)
    data = tokenize_task(task, tokenizer, args.max_seq_len)
    from cached_mslt.evaluation.bottom import task_bottom

    stores = task_bottom(
        checkpoint, task, data, tokenizer, args, StoreLocation(), str(tmp_path / "out" / "cache")
    )
    assert stores.stats["reused"] is True
    model = load_classifier(checkpoint, task.num_labels).eval()
    for split in SPLITS:
        live, labels = encoder_features(model, data[split], DataCollatorWithPadding(tokenizer))
        stored, stored_labels = stored_features(model, stores, split)
        assert torch.equal(labels, stored_labels)
        torch.testing.assert_close(stored, live, rtol=0, atol=1e-5)  # sdpa: padding ~1e-6


@pytest.mark.slow  # ~50 s: every shard of three stores is a request to the loopback server
def test_cache_url_on_the_loopback_s3_server(checkpoint, task_file, tmp_path, s3_bucket):
    bucket, options = s3_bucket
    location = StoreLocation(f"s3://{bucket}/ft", options)
    args = frozen_args(tmp_path, finetune_epochs=1)
    result = finetune(checkpoint, str(task_file), args, location=location)
    assert result["frozen_bottom"]["urls"]["train"] == f"s3://{bucket}/ft/toy/frozen-2/train"
    again = finetune(checkpoint, str(task_file), args, location=location)
    assert again["frozen_bottom"]["reused"] is True
    assert again["runs"][0]["test_loss"] == result["runs"][0]["test_loss"]


@pytest.mark.slow
def test_two_ranks_build_the_store_once_and_fine_tune_progressively_from_s3(
    checkpoint, task_file, tmp_path, s3_bucket
):
    bucket, options = s3_bucket
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    cmd += [str(REPO / "pipelines" / "finetune.py"), "--checkpoint", str(checkpoint)]
    cmd += ["--task", str(task_file), "--task_dir", str(tmp_path / "tasks"), "--seeds", "0", "1"]
    cmd += ["--output_dir", str(tmp_path / "out"), "--overlap_corpus", "none"]
    cmd += ["--finetune_batch_size", "8", "--finetune_epochs", "2", "--freeze_layers", "1"]
    cmd += ["--freeze", "progressive", "--freeze_interval", "2", "--freeze_percentile", "100"]
    cmd += ["--cache_url", f"s3://{bucket}/ft", "--cache_storage_options", json.dumps(options)]
    cmd += ["--evaluation", "finetune", "probe"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads((tmp_path / "out" / "toy" / "finetune_results.json").read_text())
    built = result["frozen_bottom"]
    assert built["rows"] == 120 and min(built["rows_per_process"]) > 0  # both ranks wrote
    assert all(r["final_depth"] == LAYERS - 1 for r in result["runs"])
    probe = json.loads((tmp_path / "out" / "toy" / "probe_results.json").read_text())
    assert probe["frozen_bottom"]["reused"] is True
