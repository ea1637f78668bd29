"""Stores on object stores (s3://, gs://, ...): reachability, credentials, exclusive create.

Credentials reach fsspec from the environment (AWS_* variables) or from storage options;
`public_options` is what of those options may be written down (config files, logs).
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore

from storage.errors import StoreSpecError, StoreUnreachableError

# Option names (at any depth, any case) that hold secrets in fsspec backends: s3fs
# (key, secret, token, aws_*), gcsfs (token), adlfs (account_key, sas_token, ...).
SECRET_NAMES = frozenset({"key", "secret", "token", "password", "passwd", "credential"})
SECRET_PARTS = ("secret", "token", "password", "access_key", "account_key", "credential")
# The reachability probe fails in seconds, not after botocore's default retries (~10 s
# against a closed port, minutes against a blackholed one).
PROBE_S3_CONFIG = {"retries": {"max_attempts": 2}, "connect_timeout": 5, "read_timeout": 20}


def is_secret(name: str) -> bool:
    lowered = name.lower()
    return lowered in SECRET_NAMES or any(part in lowered for part in SECRET_PARTS)


def public_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """`options` without anything that looks like a credential (recursively)."""
    return {
        k: public_options(v) if isinstance(v, dict) else v
        for k, v in (options or {}).items()
        if not is_secret(k)
    }


def with_timeouts(
    url: str | None, options: dict[str, Any], *, connect_s: float, read_s: float
) -> dict[str, Any]:
    """`options` for `url` with bounded waits: botocore's defaults (60 s connect, 60 s read,
    retried) made a loopback endpoint that accepts and never answers fail after 318 s.
    s3fs hands `config_kwargs` to botocore; values the user set there win."""
    options = dict(options or {})
    if url is None or url.split("://", 1)[0] not in ("s3", "s3a"):
        return options
    bounded = {"connect_timeout": connect_s, "read_timeout": read_s, "retries": {"max_attempts": 2}}
    options["config_kwargs"] = {**bounded, **options.get("config_kwargs", {})}
    return options


def is_remote(url: str | os.PathLike[str]) -> bool:
    text = os.fspath(url)
    return "://" in text and not text.startswith(("file://", "memory://"))


def check_reachable(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Fail early, with one message, if `url`'s bucket (or container) cannot be used.

    Local paths and memory:// always pass. The message names the URL and the endpoint,
    never a credential.
    """
    if not is_remote(url):
        return
    options = dict(storage_options or {})
    protocol = url.split("://", 1)[0]
    if protocol in ("s3", "s3a"):
        config = {**PROBE_S3_CONFIG, **options.get("config_kwargs", {})}
        options = {**options, "config_kwargs": config, "skip_instance_cache": True}
    endpoint = (storage_options or {}).get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    where = f"{url}" + (f" (endpoint {endpoint})" if endpoint else "")
    hint = (
        "check --cache_url, --cache_storage_options and the AWS_* environment variables "
        "(waits are bounded by --cache_connect_timeout_s and --cache_read_timeout_s)"
    )
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
        fs.retries = 1  # s3fs retries 5 times itself: a probe's answer is its first
        bucket = path.split("/", 1)[0]
        fs.info(bucket)
    except FileNotFoundError:
        raise StoreUnreachableError(
            f"cannot use {where}: bucket {bucket!r} does not exist. Create it first "
            f"(`python -m storage.bucket s3://{bucket}`), or {hint}"
        ) from None
    except ImportError as e:
        raise StoreSpecError(f"cannot open {url}: {e} (pip install s3fs for s3://)") from None
    except Exception as e:  # connection refused, DNS, TLS, access denied: all mean "not usable"
        raise StoreUnreachableError(
            f"cannot reach {where}: {type(e).__name__}: {e}. Is the service running? {hint}"
        ) from None


def create_exclusive(store: Store, key: str, payload: bytes) -> tuple[bool, bool]:
    """Write `key` only if it does not exist: (created, atomic).

    Atomic on a LocalStore (link into place) and on fsspec filesystems that implement
    `mode="create"` (s3fs sends `If-None-Match: *`, which AWS S3 and moto honour; a
    backend that ignores the header silently overwrites; the caller reads the lock back, which
    catches that only when the other write landed first).
    Elsewhere it falls back to Zarr's exists-then-set, which two simultaneous writers
    can both pass: `atomic` is False then.
    """
    buffer = default_buffer_prototype().buffer.from_bytes(payload)
    if isinstance(store, FsspecStore):
        path = f"{store.path.rstrip('/')}/{key}"
        try:
            sync(store.fs._pipe_file(path, payload, mode="create"))
            return True, True
        except FileExistsError:
            return False, True
        except (TypeError, NotImplementedError):
            pass  # a filesystem without mode="create"
    existed = sync(store.exists(key))
    sync(store.set_if_not_exists(key, buffer))
    return not existed, not isinstance(store, FsspecStore)
