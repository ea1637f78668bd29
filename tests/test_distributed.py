"""Two real ranks over gloo on the CPU (docs/library-facts.md: `--cpu --num_processes 2` alone starts one
process, so the launch says --multi_gpu with ACCELERATE_USE_CPU=1)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import zarr
from transformers import BertForMaskedLM

from cached_mslt.rundir import RunLayout
from cached_mslt.stages.runner import run_stage
from cached_mslt.training.metrics import read_metrics
from tests.conftest import device_under_test, small_run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "two_rank_stage.py"


def launch_two_ranks(prepared, run_dir, stage, *extra, **overrides):
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if device_under_test().type == "cpu":  # on CUDA (scripts/gpu_check.sh): NCCL, a GPU a rank
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(SCRIPT),
        str(prepared),
        str(run_dir),
        str(stage),
        json.dumps(overrides),
        *extra,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def start_from_stage_one(source_run, target_run):
    target_run.mkdir()
    shutil.copytree(source_run / "stage-1", target_run / "stage-1")
    shutil.copy(source_run / "config.json", target_run / "config.json")


def test_two_rank_build_and_training_match_one_process(prepared_dir, tmp_path):
    # dropout 0: the two ranks draw different dropout masks than one process would.
    common = dict(dropout=0.0, stage_steps="4", cache="always", cache_dtype="float32")
    one = small_run(prepared_dir, tmp_path / "one", batch_size=16, **common)
    run_stage(one, 1)
    run_stage(one, 2)
    start_from_stage_one(tmp_path / "one", tmp_path / "two")
    launch_two_ranks(prepared_dir, tmp_path / "two", 2, batch_size=8, **common)

    # The store is byte-identical: same rows, same chunking, every shard written once.
    a = zarr.open_group(str(tmp_path / "one" / "cache" / "stage-2"), mode="r")
    b = zarr.open_group(str(tmp_path / "two" / "cache" / "stage-2"), mode="r")
    for name in ("hidden", "attention_mask", "labels", "row_index", "shard_done"):
        assert a[name][:].tobytes() == b[name][:].tobytes(), name
    assert (
        json.loads((RunLayout.of(one).stage_dir(2) / "manifest.json").read_text())["num_processes"]
        == 1
    )
    two_manifest = json.loads((tmp_path / "two" / "stage-2" / "manifest.json").read_text())
    assert two_manifest["num_processes"] == 2
    # The build's record counts every process's rows, not process 0's alone.
    cache = two_manifest["cache"]
    assert len(cache["rows_per_process"]) == 2 and all(cache["rows_per_process"])
    assert cache["rows"] == sum(cache["rows_per_process"]) == cache["store_rows"]

    # Same global batch (16 rows), so the same rows each step: the losses agree. The two-rank
    # loss is a mean of per-rank means, so gradients agree to rounding only; AdamW turns the
    # sign of a near-zero gradient into a full +-lr step, so a few elements may differ by
    # up to 2 * lr * steps while nearly all agree closely.
    loss_one = [r["train_loss"] for r in read_metrics(tmp_path / "one") if r["stage"] == "stage-2"]
    loss_two = [r["train_loss"] for r in read_metrics(tmp_path / "two") if r["stage"] == "stage-2"]
    assert len(loss_one) == len(loss_two) == 4
    # The learning-rate schedule follows global steps on any number of ranks (Accelerate
    # steps a scheduler once per process; the schedule here follows progress instead).
    lr_one = [r["lr"] for r in read_metrics(tmp_path / "one") if r["stage"] == "stage-2"]
    lr_two = [r["lr"] for r in read_metrics(tmp_path / "two") if r["stage"] == "stage-2"]
    assert lr_one == lr_two
    np.testing.assert_allclose(loss_one[:2], loss_two[:2], rtol=1e-6)
    np.testing.assert_allclose(loss_one, loss_two, rtol=1e-3)
    p1 = BertForMaskedLM.from_pretrained(RunLayout.of(one).stage_dir(2) / "model").state_dict()
    p2 = BertForMaskedLM.from_pretrained(tmp_path / "two" / "stage-2" / "model").state_dict()
    for k in p1:
        if "embeddings" in k or ".layer.0." in k or ".layer.1." in k:
            assert torch.equal(p1[k], p2[k]), k  # the frozen bottom: untouched on every rank
        else:
            assert (p1[k] - p2[k]).abs().max() <= 2 * one.train.learning_rate * 4, k
