"""`python -m storage.loopback` serves an S3 API on 127.0.0.1 until stopped and prints the
exports; `python -m storage.bucket` creates a bucket on it (waiting for it to answer) and
says so in one line when it cannot (docs/scaling.md)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage import check_reachable

pytest.importorskip("moto.server", reason="pip install -e '.[dev]' (moto[server])")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_of(exports: str) -> dict[str, str]:
    """The variables an `export A=1 B=2` line sets."""
    return dict(pair.split("=", 1) for pair in exports.removeprefix("export ").split())


def bucket_command(url: str, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "storage.bucket", url, *extra]
    full = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=120, cwd=REPO)


# slow (`make test-slow`): 7-17 s; the default suite is kept under 10 minutes (2026-12-03)
@pytest.mark.slow
def test_loopback_serves_until_stopped_and_the_bucket_command_creates_a_bucket():
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "storage.loopback", "--port", str(port)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        lines = [server.stdout.readline() for _ in range(3)]
        assert f"on http://127.0.0.1:{port} until stopped" in lines[0], lines
        env = env_of(lines[2].strip())
        assert env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
        first = bucket_command("s3://trial-bucket/runs/x", env)
        assert first.returncode == 0 and "created" in first.stdout, first.stderr
        assert first.stderr == ""
        again = bucket_command("s3://trial-bucket", env)
        assert again.returncode == 0 and "exists already" in again.stdout, again.stderr
        options = {"endpoint_url": env["AWS_ENDPOINT_URL"], "key": env["AWS_ACCESS_KEY_ID"]}
        check_reachable("s3://trial-bucket/runs/x", {**options, "secret": "any"})
        time.sleep(0.2)
        assert server.poll() is None  # still serving
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        assert "S3 API stopped" in server.stdout.read()
        assert server.stderr.read() == ""  # no runpy warning, no traceback
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# slow (`make test-slow`): 10-31 s each; the default suite took 12 minutes idle (2026-12-03)
@pytest.mark.slow
def test_the_bucket_command_fails_in_one_line_when_nothing_answers():
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "k"}
    env["AWS_SECRET_ACCESS_KEY"] = "s"
    done = bucket_command("s3://nobody-home", env, "--wait", "0")
    assert done.returncode == 1
    assert re.fullmatch(
        r"error: cannot create bucket 'nobody-home' .*AWS_ENDPOINT_URL.*\n", done.stderr
    )
    not_remote = bucket_command("/tmp/some/dir", env)
    assert not_remote.returncode == 1 and "not an object-store URL" in not_remote.stderr


@pytest.mark.slow
def test_the_server_in_its_own_process_serves_a_bucket_and_stops_with_its_context():
    import s3fs

    from storage import loopback_s3_process

    with loopback_s3_process("own-process") as options:
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        fs.pipe("own-process/x", b"0123456789")
        assert fs.cat_file("own-process/x", start=2, end=5) == b"234"
        port = int(options["endpoint_url"].rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # nothing listens once the context has ended
