"""Fault tests with real `pipelines/stage.py` processes (docs/reliability.md): SIGKILL at
random points resumes to bitwise-equal results, a second command on a training stage is
refused, a real full filesystem is reported in words. Slow: `make test-slow`."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from transformers import BertForMaskedLM

from cached_mslt.training.metrics import read_metrics

pytestmark = pytest.mark.slow
STEPS = 150  # long enough that a random kill lands in training, not only in imports
REPO = Path(__file__).resolve().parents[1]


def stage_cmd(
    prepared: Path, run_dir: Path, stage: int, steps: int = 30, cache: str = "always"
) -> list[str]:
    return [
        sys.executable,
        str(REPO / "pipelines" / "stage.py"),
        "--stage", str(stage),
        "--prepared_dir", str(prepared),
        "--run_dir", str(run_dir),
        "--seq_len", "32",
        "--views", "1",
        "--num_layers", "4",
        "--hidden_size", "32",
        "--num_attention_heads", "2",
        "--intermediate_size", "64",
        "--stage_layers", "2,4",
        "--stage_steps", str(steps),
        "--batch_size", "8",
        "--eval_every", "10",
        "--log_every", "1",
        "--checkpoint_every", "3",
        "--cache", cache,
        "--cache_dtype", "float32",
        "--warmup_fraction", "0",
    ]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)


def state(path: Path) -> dict[str, torch.Tensor]:
    return BertForMaskedLM.from_pretrained(path).state_dict()


@pytest.mark.parametrize("cache", ["always", "write-through"])
def test_sigkill_at_random_points_resumes_to_bitwise_equal_results(prepared_dir, tmp_path, cache):
    straight = tmp_path / "straight"
    took = {}
    for stage in (1, 2):
        began = time.perf_counter()
        assert run(stage_cmd(prepared_dir, straight, stage, STEPS, cache)).returncode == 0
        took[stage] = time.perf_counter() - began
    killed = tmp_path / "killed"
    rng = random.Random(13)
    kills = 0
    for stage in (1, 2):
        for _ in range(3):  # up to three SIGKILLs a stage, at random moments
            proc = subprocess.Popen(
                stage_cmd(prepared_dir, killed, stage, STEPS, cache),
                env=env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            # anywhere from imports through build and training to the model save
            time.sleep(rng.uniform(0.2, 0.95) * took[stage])
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
        done = run(stage_cmd(prepared_dir, killed, stage, STEPS, cache))
        assert done.returncode == 0, done.stderr[-3000:]
    assert kills >= 1, "no kill landed: the runs finished before the timer"
    a, b = state(straight / "stage-2" / "model"), state(killed / "stage-2" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = zarr.open_array(str(straight / "cache" / "stage-2"), path="hidden", mode="r")[:]
    sb = zarr.open_array(str(killed / "cache" / "stage-2"), path="hidden", mode="r")[:]
    assert np.array_equal(sa.view(np.uint32), sb.view(np.uint32))
    ref = [(r["stage"], r["step"]) for r in read_metrics(straight)]
    got = [(r["stage"], r["step"]) for r in read_metrics(killed)]
    assert got == ref, "each step logged exactly once after the kills"


def test_second_command_on_a_training_stage_is_refused(prepared_dir, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        stage_cmd(prepared_dir, run_dir, 1, steps=100000),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = run_dir / "stage-1" / "owner.lock"
        for _ in range(600):
            if lock.exists():
                break
            time.sleep(0.1)
        assert lock.exists()
        second = run(stage_cmd(prepared_dir, run_dir, 1, steps=100000))
        assert second.returncode == 1
        assert f"is already running: pid {first.pid}" in second.stderr
        assert first.poll() is None  # the owner trains on
    finally:
        first.kill()
        first.wait()


def test_real_full_filesystem_is_reported_in_words(prepared_dir, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    try:
        done = run(stage_cmd(prepared_dir, mount / "run", 1))
        assert done.returncode != 0
        error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert error and "no space left on the device" in error[0], done.stderr[-3000:]
        assert "MiB free there" in error[0]
        assert not list((mount / "run").glob("stage-1/*.tmp"))
        assert not (mount / "run" / "stage-1" / "manifest.json").exists()
    finally:
        subprocess.run(["umount", str(mount)], check=False)
