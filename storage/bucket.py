"""Create an object-store bucket for a run's cache, with the tools the project installs
(s3fs): `python -m storage.bucket s3://my-bucket [--storage_options JSON] [--wait 30]`.

Endpoint and credentials come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY) or the options, as for a run. An existing bucket is left as it is.
Exit code 0 when the bucket exists afterwards, 1 (one line on stderr) when it does not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import fsspec

from storage.errors import StoreSpecError, StoreUnreachableError
from storage.remote import PROBE_S3_CONFIG, is_remote


def make_bucket(
    url: str, storage_options: dict[str, Any] | None = None, wait_s: float = 30
) -> bool:
    """Create the bucket of `url` unless it exists; True if it was created now. Retries for
    `wait_s` seconds while the endpoint does not answer (a server just started)."""
    if not is_remote(url):
        raise StoreSpecError(f"{url} is not an object-store URL; expected e.g. s3://my-bucket")
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):  # fail each try in seconds, then try again
        options["config_kwargs"] = {**PROBE_S3_CONFIG, **options.get("config_kwargs", {})}
    fs, path = fsspec.core.url_to_fs(url, **options, skip_instance_cache=True)
    bucket = path.split("/", 1)[0]
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if fs.exists(bucket):
                return False
            fs.mkdir(bucket)
            return True
        except Exception as e:  # refused, DNS, timed out, denied: botocore's own types too
            if time.monotonic() >= deadline:
                raise StoreUnreachableError(
                    f"cannot create bucket {bucket!r} of {url}: {type(e).__name__}: {e}; "
                    "expected a reachable endpoint: check AWS_ENDPOINT_URL and the AWS_* "
                    "credentials (or --storage_options)"
                ) from None
            time.sleep(1)
            fs.invalidate_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="s3://bucket (a prefix after the bucket is ignored)")
    parser.add_argument("--storage_options", default=None, help='JSON, e.g. {"endpoint_url": ...}')
    parser.add_argument("--wait", type=float, default=30, help="seconds to wait for the endpoint")
    args = parser.parse_args(argv)
    try:
        options = json.loads(args.storage_options) if args.storage_options else {}
        created = make_bucket(args.url, options, args.wait)
    except (ValueError, StoreSpecError, StoreUnreachableError) as e:  # JSON errors are ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"bucket of {args.url}: {'created' if created else 'exists already'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
