"""`make gpu-check` (scripts/gpu_check.sh) on a machine without CUDA: it says so, writes
that to its report and exits 0, running nothing else (docs/quickstart.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: run make gpu-check")
def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    env = {**os.environ, "GPU_CHECK_DIR": str(tmp_path / "check")}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), sys.executable],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA device here" in done.stdout
    report = (tmp_path / "check" / "report.md").read_text()
    assert "nothing to check" in report
    assert sorted(p.name for p in (tmp_path / "check").iterdir()) == ["report.md"]
