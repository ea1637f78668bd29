"""Two "machines" on one host: two `accelerate launch --num_machines 2` invocations of
pipelines/stage.py, one process each, the cache on an S3 API (moto on loopback), the run
directory shared. The result equals a one-process run (dropout off), as docs/scaling.md's
recipe promises."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from transformers import BertForMaskedLM

from cached_mslt.rundir import RunLayout
from cached_mslt.stages.runner import run_stage
from cached_mslt.training.metrics import read_metrics
from tests.conftest import small_run
from tests.test_distributed import start_from_stage_one

REPO = Path(__file__).resolve().parents[1]
COMMON = dict(dropout=0.0, stage_steps="4", cache="always", cache_dtype="float32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_machine(rank: int, port: int, config: Path, env: dict, log: Path) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu"]
    cmd += ["--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2"]
    cmd += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(REPO / "pipelines" / "stage.py"), "--config", str(config), "--stage", "2"]
    cmd += ["--batch_size", "8"]  # per process: the same global batch as one process of 16
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_machines_with_the_cache_on_s3_equal_one_process(prepared_dir, tmp_path, s3_bucket):
    bucket, options = s3_bucket
    one = small_run(prepared_dir, tmp_path / "one", batch_size=16, **COMMON)
    run_stage(one, 1)
    run_stage(one, 2)
    start_from_stage_one(tmp_path / "one", tmp_path / "two")
    two = small_run(
        prepared_dir, tmp_path / "two", batch_size=16, cache_url=f"s3://{bucket}/run", **COMMON
    )
    config = tmp_path / "stage.json"
    two.save(config)

    # As on a cluster: endpoint and credentials in each node's environment, not in files.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env |= {"AWS_ENDPOINT_URL": options["endpoint_url"], "AWS_ACCESS_KEY_ID": options["key"]}
    env |= {"AWS_SECRET_ACCESS_KEY": options["secret"]}
    port = free_port()
    logs = [tmp_path / f"machine-{r}.log" for r in (0, 1)]
    machines = [launch_machine(r, port, config, env, logs[r]) for r in (0, 1)]
    try:
        codes = [m.wait(timeout=600) for m in machines]
    finally:
        for m in machines:
            if m.poll() is None:
                m.kill()
                m.wait(timeout=30)
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)

    manifest = json.loads((tmp_path / "two" / "stage-2" / "manifest.json").read_text())
    assert manifest["num_processes"] == 2
    assert manifest["cache"]["url"] == f"s3://{bucket}/run/stage-2"
    a = zarr.open_group(str(tmp_path / "one" / "cache" / "stage-2"), mode="r")
    b = zarr.open_group(f"s3://{bucket}/run/stage-2", mode="r", storage_options=options)
    for name in ("hidden", "attention_mask", "labels", "row_index", "shard_done"):
        assert a[name][:].tobytes() == b[name][:].tobytes(), name
    # Same rows per step; the loss of two ranks is a mean of per-rank means, so it agrees to
    # rounding, and AdamW may turn a near-zero gradient's sign into a +-lr step
    # (tests/test_distributed.py): the same bounds as two ranks on one machine.
    loss = {
        run: [r["train_loss"] for r in read_metrics(tmp_path / run) if r["stage"] == "stage-2"]
        for run in ("one", "two")
    }
    assert len(loss["one"]) == len(loss["two"]) == 4
    np.testing.assert_allclose(loss["one"][:2], loss["two"][:2], rtol=1e-6)
    np.testing.assert_allclose(loss["one"], loss["two"], rtol=1e-3)
    p1 = BertForMaskedLM.from_pretrained(RunLayout.of(one).stage_dir(2) / "model").state_dict()
    p2 = BertForMaskedLM.from_pretrained(tmp_path / "two" / "stage-2" / "model").state_dict()
    for k in p1:
        if "embeddings" in k or ".layer.0." in k or ".layer.1." in k:
            assert torch.equal(p1[k], p2[k]), k
        else:
            assert (p1[k] - p2[k]).abs().max() <= 2 * one.train.learning_rate * 4, k
