"""`pipelines/inspect_cache.py` on stores in an object store: `--storage_options`, the run's
config.json endpoint when given a run directory (credentials never saved: they come from
the environment or the option), and every failure one line with a documented exit code
(docs/inspect.md)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cached_mslt.stages import run_stage
from tests.conftest import small_run

REPO = Path(__file__).resolve().parents[1]


def dead_endpoint() -> str:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def inspect(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "pipelines" / "inspect_cache.py"), *args]
    full = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    full |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def s3_run(prepared_dir, tmp_path_factory, s3_server):
    """A finished 2-stage run whose stage-2 store is on the loopback S3 server."""
    import s3fs

    s3fs.S3FileSystem(**s3_server, skip_instance_cache=True).mkdir("inspect-remote")
    run_dir = tmp_path_factory.mktemp("s3run") / "run"
    args = small_run(
        prepared_dir,
        run_dir,
        stage_steps="2",
        cache_url="s3://inspect-remote/run",
        cache_storage_options=json.dumps(s3_server),
    )
    run_stage(args, 1)
    run_stage(args, 2)
    return run_dir, s3_server


# slow (`make test-slow`): 7-17 s; the default suite is kept under 10 minutes (2026-12-03)
@pytest.mark.slow
def test_a_run_directory_is_read_with_its_config_endpoint_and_env_credentials(s3_run):
    run_dir, options = s3_run
    saved = json.loads((run_dir / "config.json").read_text())["schedule"]
    assert json.loads(saved["cache_storage_options"]) == {"endpoint_url": options["endpoint_url"]}
    # the environment's endpoint is dead: only config.json's can have reached the store
    env = {"AWS_ENDPOINT_URL": dead_endpoint(), "AWS_ACCESS_KEY_ID": options["key"]}
    env["AWS_SECRET_ACCESS_KEY"] = options["secret"]
    done = inspect(str(run_dir), "--verify", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "s3://inspect-remote/run/stage-2" in done.stdout


# slow (`make test-slow`): 7-17 s; the default suite is kept under 10 minutes (2026-12-03)
@pytest.mark.slow
def test_storage_options_reach_a_store_url_and_are_never_printed(s3_run):
    _, options = s3_run
    env = {"AWS_ENDPOINT_URL": dead_endpoint()}
    done = inspect(
        "s3://inspect-remote/run/stage-2", "--storage_options", json.dumps(options), env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert options["secret"] not in done.stdout + done.stderr


# slow (`make test-slow`): 10-31 s each; the default suite took 12 minutes idle (2026-12-03)
@pytest.mark.slow
def test_an_unreachable_endpoint_is_one_line_and_exit_code_7(s3_run):
    run_dir, options = s3_run
    dead = json.dumps({"endpoint_url": dead_endpoint()})
    env = {"AWS_ACCESS_KEY_ID": options["key"], "AWS_SECRET_ACCESS_KEY": options["secret"]}
    done = inspect(str(run_dir), "--storage_options", dead, env=env)
    assert done.returncode == 7, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: cannot reach")


# slow (`make test-slow`): 6-9 s; the default suite took 10.7 minutes on a fresh clone (2026-12-03)
@pytest.mark.slow
def test_bad_storage_options_are_one_line_and_exit_code_2_without_echoing_them(tmp_path):
    done = inspect(str(tmp_path), "--storage_options", '{"secret": "hunter2"', env={})
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "not valid JSON" in done.stderr and "hunter2" not in done.stderr


def test_an_unexpected_error_is_one_line_and_exit_code_1(tmp_path, monkeypatch, capsys):
    import pipelines.inspect_cache as cli

    def broken(opts):
        raise RuntimeError("zarr said:\nsomething odd")

    monkeypatch.setattr(cli, "gather", broken)
    assert cli.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == "error: unexpected RuntimeError: zarr said: something odd (--traceback shows where)\n"
    )
    with pytest.raises(RuntimeError):
        cli.main([str(tmp_path), "--traceback"])
