"""An S3 API on 127.0.0.1 for tests, benchmarks and a local trial of a cluster run: moto's
threaded server (dev extra).

    python -m storage.loopback --port 9000     # serves until stopped (Ctrl-C or SIGTERM)

prints the endpoint and the `export` lines a shell needs to use it (moto accepts any
credentials; these are placeholders, not secrets). Not for production data: moto keeps
every object in this process's memory. Create buckets with `python -m storage.bucket`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

LOOPBACK = "127.0.0.1"
PLACEHOLDER_CREDENTIALS = {"key": "loopback-key", "secret": "loopback-secret"}


@contextmanager
def loopback_s3(bucket: str | None = None, port: int = 0) -> Iterator[dict[str, Any]]:
    """Start moto on 127.0.0.1 and `port` (0: a free one), create `bucket` if given, yield
    the storage options a client needs (moto accepts any credentials), stop it afterwards."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=port, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}", **PLACEHOLDER_CREDENTIALS}
        if bucket:
            s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(bucket)
        yield options
    finally:
        server.stop()


@contextmanager
def loopback_s3_process(
    bucket: str | None = None, timeout_s: float = 60.0
) -> Iterator[dict[str, Any]]:
    """`loopback_s3` served by its own process (`python -m storage.loopback --port 0`), as a
    real object store is served by other machines: its request handling then neither holds
    the client's GIL nor runs on the client's thread (docs/benchmarks.md, "The loader in
    bytes"). Yields the same storage options; stops the server afterwards."""
    import s3fs

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen(
        [sys.executable, "-m", "storage.loopback", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        endpoint = _await_endpoint(server, timeout_s)
        options = {"endpoint_url": endpoint, **PLACEHOLDER_CREDENTIALS}
        if bucket:
            s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(bucket)
        yield options
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _await_endpoint(server: subprocess.Popen, timeout_s: float) -> str:
    """The endpoint the server prints first (a line read with a deadline on a thread)."""
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(server.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    match = re.search(r"http://127\.0\.0\.1:\d+", found[0]) if found else None
    if match is None:
        raise RuntimeError(
            f"the loopback S3 server (python -m storage.loopback) printed no endpoint within "
            f"{timeout_s:.0f} s (exit code {server.poll()}); is moto installed (the dev extra)?"
        )
    return match.group(0)


def export_lines(options: dict[str, Any]) -> str:
    """The shell lines that point fsspec/s3fs (and every `accelerate launch`) at the server."""
    return (
        f"export AWS_ENDPOINT_URL={options['endpoint_url']} "
        f"AWS_ACCESS_KEY_ID={options['key']} AWS_SECRET_ACCESS_KEY={options['secret']}"
    )


def serve(port: int) -> None:
    """Serve until SIGINT or SIGTERM, then stop the server and return."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with loopback_s3(port=port) as options:
        print(f"S3 API (moto, in memory) on {options['endpoint_url']} until stopped (Ctrl-C)")
        print("in every shell that uses it:")
        print(export_lines(options), flush=True)
        stop.wait()
    print("S3 API stopped", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9000, help="on 127.0.0.1; 0: a free port")
    serve(parser.parse_args(argv).port)


if __name__ == "__main__":
    main()
