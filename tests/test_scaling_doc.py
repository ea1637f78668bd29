"""docs/scaling.md's multi-node recipe, run as written: the bash block after the marker
comment, from a scratch directory that sees the repository's `pipelines/`, with three
substitutions a second copy on a shared machine needs: free ports for 9000 (the S3 API)
and 29500 (the rendezvous), and this interpreter's venv for `.venv`."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- tests/test_scaling_doc.py runs the next block -->"


def documented_block() -> str:
    text = (REPO / "docs" / "scaling.md").read_text()
    after = text.split(MARKER, 1)[1]
    match = re.match(r"\s*```bash\n(.*?)```", after, re.S)
    assert match, f"no bash block after {MARKER}"
    return match.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_run_here(block: str) -> str:
    venv = Path(sys.executable).parent.parent
    s3, rendezvous = free_port(), free_port()
    block = block.replace("source .venv/bin/activate", f"source {venv}/bin/activate")
    block = block.replace("--port 9000", f"--port {s3}").replace(
        "127.0.0.1:9000", f"127.0.0.1:{s3}"
    )
    return block.replace("--main_process_port 29500", f"--main_process_port {rendezvous}")


def test_the_block_has_every_step():
    block = documented_block()
    for step in ("storage.loopback", "storage.bucket", "prepare_data.py", "--write_config"):
        assert step in block
    assert block.count("accelerate launch") == 2 and "--mixed_precision bf16" in block


@pytest.mark.slow
def test_the_documented_multinode_recipe_runs_all_stages_on_two_machines(tmp_path):
    (tmp_path / "pipelines").symlink_to(REPO / "pipelines")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ACCELERATE_"))}
    env["PYTHONPATH"] = str(REPO)  # the venv's editable install may point at another checkout
    script = as_run_here(documented_block())
    done = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    logs = "".join(
        (tmp_path / f"machine-{r}.log").read_text()[-3000:]
        for r in (0, 1)
        if (tmp_path / f"machine-{r}.log").exists()
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs

    run = tmp_path / "runs" / "trial"
    for k in (1, 2, 3, 4):
        manifest = json.loads((run / f"stage-{k}" / "manifest.json").read_text())
        assert manifest["num_processes"] == 2 and manifest["mixed_precision"] == "bf16"
        if k > 1:
            assert manifest["cache"]["url"] == f"s3://mslt-trial/runs/trial/stage-{k}"
            assert manifest["cache"]["rows_per_process"] == [256, 256]
            assert manifest["cache"]["store_rows"] == 512
    summary = (run / "summary.md").read_text()
    assert summary.count("| bf16 |") == 4 and summary in done.stdout
    assert (run / "val_loss.png").stat().st_size > 0
    assert "built 512 rows on 2 process(es) (256, 256)" in done.stdout
    saved = json.loads((run / "config.json").read_text())
    assert "secret" not in json.dumps(saved)
