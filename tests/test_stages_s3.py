"""Stages with the cache on an S3 API (moto on loopback): the run is the same as on disk."""

from __future__ import annotations

import json
import os
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
from storage import ActivationStore
from tests.conftest import small_run
from tests.test_distributed import launch_two_ranks, start_from_stage_one

REPO = Path(__file__).resolve().parents[1]
ARRAYS = ("hidden", "attention_mask", "labels", "row_index", "shard_done")
# dropout 0: two ranks draw other dropout masks than one process; float32: bitwise stores
COMMON = dict(stage_layers="2,3,4", stage_steps="3", cache="always", cache_dtype="float32")
COMMON |= dict(dropout=0.0, eval_every=3, checkpoint_every=3)


def on_s3(bucket: str, options: dict) -> dict:
    return dict(cache_url=f"s3://{bucket}/cache", cache_storage_options=json.dumps(options))


def state(path: Path) -> dict[str, torch.Tensor]:
    return BertForMaskedLM.from_pretrained(path).state_dict()


def test_stages_2_and_3_on_s3_equal_a_local_run_and_store_no_credentials(
    prepared_dir, tmp_path, s3_bucket, monkeypatch, capfd
):
    bucket, options = s3_bucket
    local = small_run(prepared_dir, tmp_path / "local", **COMMON)
    for k in (1, 2, 3):
        run_stage(local, k)
    remote = small_run(prepared_dir, tmp_path / "s3", **COMMON, **on_s3(bucket, options))
    manifests = [run_stage(remote, k) for k in (1, 2, 3)][1:]

    assert [m["cache"]["url"] for m in manifests] == [
        f"s3://{bucket}/cache/stage-{k}" for k in (2, 3)
    ]
    assert manifests[1]["cache"]["how"].startswith(f"incremental from s3://{bucket}/cache/stage-2")
    for k in (2, 3):  # plain zarr + s3fs read the same bytes as the local store
        a = zarr.open_group(str(tmp_path / "local" / "cache" / f"stage-{k}"), mode="r")
        b = zarr.open_group(f"s3://{bucket}/cache/stage-{k}", mode="r", storage_options=options)
        assert b.attrs["complete"]
        for name in ARRAYS:
            assert a[name][:].tobytes() == b[name][:].tobytes(), (k, name)
        mine, theirs = (
            state(RunLayout.of(local).stage_dir(k) / "model"),
            state(RunLayout.of(remote).stage_dir(k) / "model"),
        )
        assert all(torch.equal(mine[p], theirs[p]) for p in mine), k
    assert not (tmp_path / "s3" / "cache").exists()

    # The secret is nowhere: not in config.json, manifests, metrics, nor the stores' metadata.
    import s3fs

    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    written = [p.read_text() for p in (tmp_path / "s3").rglob("*.json*")]
    written += [fs.cat(k).decode() for k in fs.find(bucket) if k.endswith("zarr.json")]
    assert written and not [t for t in written if options["secret"] in t]
    assert options["secret"] not in "".join(capfd.readouterr())  # nor in what was printed
    saved = json.loads((tmp_path / "s3" / "config.json").read_text())
    assert json.loads(saved["schedule"]["cache_storage_options"]) == {
        "endpoint_url": options["endpoint_url"]
    }

    # Inspection of the run finds the stores from the manifests; credentials from the env.
    monkeypatch.setenv("AWS_ENDPOINT_URL", options["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", options["secret"])
    from pipelines.inspect_cache import main as inspect_main

    assert inspect_main([str(tmp_path / "s3"), "--verify"]) == 0


# slow (`make test-slow`): 10-31 s each; the default suite took 12 minutes idle (2026-12-03)
@pytest.mark.slow
def test_two_ranks_build_and_train_stages_2_and_3_on_s3(prepared_dir, tmp_path, s3_bucket):
    bucket, options = s3_bucket
    one = small_run(prepared_dir, tmp_path / "one", batch_size=16, **COMMON)
    for k in (1, 2, 3):
        run_stage(one, k)
    start_from_stage_one(tmp_path / "one", tmp_path / "two")
    launch_two_ranks(
        prepared_dir, tmp_path / "two", "2,3", batch_size=8, **COMMON, **on_s3(bucket, options)
    )
    manifests = {
        k: json.loads((tmp_path / "two" / f"stage-{k}" / "manifest.json").read_text())
        for k in (2, 3)
    }
    assert all(m["num_processes"] == 2 for m in manifests.values())
    assert manifests[3]["cache"]["how"].startswith(f"incremental from s3://{bucket}/cache/stage-2")
    # Stage 2's store is byte-identical to one process's. Stage 3's is not comparable that
    # way: two ranks' stage-2 gradients agree to rounding only (tests/test_distributed.py),
    # so it must hold what the two-rank stage-2 weights compute, complete and readable.
    a = zarr.open_group(str(tmp_path / "one" / "cache" / "stage-2"), mode="r")
    b = zarr.open_group(f"s3://{bucket}/cache/stage-2", mode="r", storage_options=options)
    for name in ARRAYS:
        assert a[name][:].tobytes() == b[name][:].tobytes(), name
    three = ActivationStore.open(f"s3://{bucket}/cache/stage-3", storage_options=options)
    assert three.fingerprint["weights"] == manifests[3]["fingerprints"]["frozen_bottom"]
    assert torch.isfinite(three.read_rows(0, three.spec.num_rows)["hidden"]).all()
    loss = {
        run: [r["train_loss"] for r in read_metrics(tmp_path / run) if r["stage"] == "stage-3"]
        for run in ("one", "two")
    }
    # compounded over two stages of AdamW steps (sign flips of tiny gradients): 1e-2
    np.testing.assert_allclose(loss["one"], loss["two"], rtol=1e-2)


# slow (`make test-slow`): 7-17 s; the default suite is kept under 10 minutes (2026-12-03)
@pytest.mark.slow
def test_missing_bucket_fails_at_start_with_one_message_and_no_run(
    prepared_dir, tmp_path, s3_server
):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "pipelines" / "stage.py"), "--stage", "1"]
    cmd += ["--prepared_dir", str(prepared_dir), "--seq_len", "32", "--run_dir", str(run_dir)]
    cmd += ["--views", "1"]  # as the shared prepared data was made (tests/conftest.py)
    cmd += ["--cache_url", "s3://no-such-bucket/cache", "--cache", "always"]
    cmd += ["--cache_storage_options", json.dumps(s3_server)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot use s3://no-such-bucket/cache/stage-1"), done.stderr
    assert "bucket 'no-such-bucket' does not exist" in last
    assert "Traceback" not in done.stderr and s3_server["secret"] not in done.stderr
    assert not run_dir.exists()


def test_storage_option_secrets_stay_out_of_the_saved_config():
    from cached_mslt.config import ConfigError, run_args

    given = {"endpoint_url": "http://127.0.0.1:1", "key": "AKIA-x", "secret": "s3cr3t"}
    args = run_args("tiny", cache_storage_options=json.dumps(given))
    assert args.schedule.storage_options() == given
    saved = json.dumps(args.to_dict())
    assert "s3cr3t" not in saved and "AKIA-x" not in saved and "127.0.0.1:1" in saved
    with pytest.raises(ConfigError) as e:
        run_args("tiny", cache_storage_options='{"secret": "s3cr3t"')
    assert "s3cr3t" not in str(e.value)
