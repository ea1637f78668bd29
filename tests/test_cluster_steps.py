"""The steps a cluster user takes, each one command (docs/scaling.md): the run's config
written before stage 1, stage 2 refused before stage 1 without leaving a half-made run,
summary.md and val_loss.png after every stage run one at a time, and the cache build's
rows counted over every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cached_mslt.rundir import RunLayout
from cached_mslt.stages import run_stage, write_run_summary
from cached_mslt.stages.runner import StageError
from tests.conftest import small_run

REPO = Path(__file__).resolve().parents[1]


def python(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def small_flags(prepared: Path, run_dir: Path) -> list[str]:
    args = small_run(prepared, run_dir)
    flat = {k: v for group in args.to_dict().values() for k, v in group.items()}
    return [f"--{k}={v}" for k, v in flat.items() if v is not None and not isinstance(v, list)]


# slow (`make test-slow`): 10-31 s each; the default suite took 12 minutes idle (2026-12-03)
@pytest.mark.slow
def test_write_config_writes_the_run_config_and_nothing_else(prepared_dir, tmp_path):
    run_dir = tmp_path / "run"
    done = python(
        str(REPO / "pipelines" / "pretrain.py"),
        *small_flags(prepared_dir, run_dir),
        "--write_config",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {run_dir / 'config.json'}" in done.stdout
    # the config and the run's contract beside it (docs/reliability.md), nothing else
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "run_identity.json"]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["hidden_size"] == 32 and saved["train"]["mixed_precision"] is None
    # the same run again: kept; another run's options under this run_dir: refused
    again = python(
        str(REPO / "pipelines" / "pretrain.py"),
        "--config",
        str(run_dir / "config.json"),
        "--write_config",
    )
    assert again.returncode == 0 and "kept the same run config" in again.stdout, again.stderr
    other = python(
        str(REPO / "pipelines" / "pretrain.py"),
        "--config",
        str(run_dir / "config.json"),
        "--hidden_size",
        "64",
        "--write_config",
    )
    assert other.returncode == 1 and "hidden_size" in other.stderr
    assert len(other.stderr.strip().splitlines()) <= 4  # a message, not a traceback


def test_stage_two_before_stage_one_leaves_nothing_that_looks_like_a_run(prepared_dir, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(StageError, match="needs stage 1.*--stage 1` first"):
        run_stage(small_run(prepared_dir, run_dir), 2)
    assert not run_dir.exists()


# slow (`make test-slow`): 7-17 s; the default suite is kept under 10 minutes (2026-12-03)
@pytest.mark.slow
def test_summary_and_plot_after_every_stage_run_one_at_a_time(prepared_dir, tmp_path):
    args = small_run(prepared_dir, tmp_path / "run", stage_steps="2")
    layout = RunLayout.of(args)
    assert write_run_summary(args) is None  # nothing finished: nothing written
    run_stage(args, 1)
    text = write_run_summary(args)
    assert "| stage-1 |" in text and "stage-2" not in text
    assert layout.summary.read_text() == text and layout.loss_plot.stat().st_size > 0
    run_stage(args, 2)
    assert "| stage-2 |" in write_run_summary(args)


# slow (`make test-slow`): 6-9 s; the default suite took 10.7 minutes on a fresh clone (2026-12-03)
@pytest.mark.slow
def test_stage_py_writes_the_summary(prepared_dir, tmp_path):
    args = small_run(prepared_dir, tmp_path / "run", stage_steps="2")
    args.save(tmp_path / "run.json")
    done = python(
        str(REPO / "pipelines" / "stage.py"), "--config", str(tmp_path / "run.json"), "--stage", "1"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| stage-1 |" in RunLayout.of(args).summary.read_text()
    assert RunLayout.of(args).loss_plot.is_file()


def test_cache_build_counts_rows_over_every_process(prepared_dir, tmp_path, capsys):
    args = small_run(prepared_dir, tmp_path / "run", stage_steps="2")
    run_stage(args, 1)
    manifest = run_stage(args, 2)
    rows = manifest["cache"]["store_rows"]
    assert manifest["cache"]["rows"] == rows and manifest["cache"]["rows_per_process"] == [rows]
    assert f"built {rows} rows on 1 process(es) ({rows})" in capsys.readouterr().out
