"""An S3 API on 127.0.0.1 for tests and benchmarks: moto's threaded server (dev extra).

Not for production data: moto keeps every object in this process's memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def loopback_s3(bucket: str | None = None) -> Iterator[dict[str, Any]]:
    """Start moto on 127.0.0.1 and a free port, create `bucket` if given, yield the
    storage options a client needs (moto accepts any credentials), stop it afterwards."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {
            "endpoint_url": f"http://{host}:{port}",
            "key": "loopback-key",
            "secret": "loopback-secret",
        }
        if bucket:
            s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(bucket)
        yield options
    finally:
        server.stop()
