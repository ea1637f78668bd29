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
import signal
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
