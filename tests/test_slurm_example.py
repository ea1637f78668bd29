"""examples/slurm-stage.sh run with stand-ins for srun, scontrol and getent (no SLURM cluster
here): the processes follow --gpus-per-node, the venv is activated, the main address is an
address, every stage runs in one job (or the one asked for), and a missing config stops it
before srun."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "slurm-stage.sh"


def fake_tools(bin_dir: Path, venv: Path, calls: Path) -> None:
    """srun runs its command as node 0 of 2; accelerate records its arguments and venv."""
    bin_dir.mkdir()
    tools = {
        "scontrol": 'printf "gpu-node-a\\ngpu-node-b\\n"',
        "getent": 'echo "10.1.2.3      STREAM gpu-node-a"; echo "10.1.2.3      DGRAM"',
        "srun": 'shift; SLURM_NODEID=0 SLURM_NNODES=2 "$@"',
    }
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    (venv / "bin").mkdir(parents=True)
    accelerate = venv / "bin" / "accelerate"
    accelerate.write_text(f'#!/bin/bash\necho "$VIRTUAL_ENV $*" > {calls}\n')
    accelerate.chmod(0o755)
    # activation puts the venv first on PATH only in a real venv; the stand-in adds it here
    (venv / "bin" / "activate").write_text(f"export VIRTUAL_ENV={venv}; PATH={venv}/bin:$PATH\n")


def run_script(tmp_path: Path, *args: str, gpus: str = "a100:4") -> tuple[int, str, str]:
    calls, venv = tmp_path / "calls.txt", tmp_path / "venv"
    fake_tools(tmp_path / "bin", venv, calls)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "VENV": str(venv)}
    env |= {"SLURM_JOB_NODELIST": "gpu-node-[a-b]", "SLURM_SUBMIT_DIR": str(tmp_path)}
    env.pop("SLURM_GPUS_PER_NODE", None)
    if gpus:
        env["SLURM_GPUS_PER_NODE"] = gpus
    done = subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    recorded = calls.read_text() if calls.exists() else ""
    return done.returncode, recorded, done.stderr


def test_one_job_runs_every_stage_with_the_allocated_gpus(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    code, call, err = run_script(tmp_path, "config.json")
    assert code == 0, err
    venv, args = call.split(" ", 1)
    assert venv == str(tmp_path / "venv")
    assert "--num_machines 2 --machine_rank 0 --num_processes 8 " in args
    assert "--main_process_ip 10.1.2.3 --main_process_port 29500" in args
    assert "--mixed_precision bf16" in args
    assert args.strip().endswith("pipelines/pretrain.py --config config.json")


def test_a_stage_argument_runs_only_that_stage(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    code, call, err = run_script(tmp_path, "config.json", "3")
    assert code == 0, err
    assert call.strip().endswith("pipelines/stage.py --stage 3 --config config.json")


def test_a_missing_config_or_gpu_count_stops_before_srun(tmp_path):
    (tmp_path / "a").mkdir()
    code, call, err = run_script(tmp_path / "a", "runs/base/config.json")
    assert code == 2 and call == "" and "--write_config" in err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("{}")
    code, call, err = run_script(tmp_path / "b", "config.json", gpus="")
    assert code != 0 and call == "" and "--gpus-per-node" in err
