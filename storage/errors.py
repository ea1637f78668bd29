"""Exceptions of the activation store.

Every refusal has its own type so a caller can act on it (resume, rebuild, wait), and
every message says what was expected, what was found and what to run next.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by `storage`."""


class StoreSpecError(StoreError, ValueError):
    """A `StoreSpec` (or a layout argument) is invalid."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No activation store at the given location."""


class StoreExistsError(StoreError, FileExistsError):
    """`create` found something it must not silently reuse or wipe."""


class StoreLockedError(StoreError):
    """Another build holds the store's build lock."""


class IncompleteStoreError(StoreError):
    """The store is not `complete`: some shards were never written or marked."""


class StaleStoreError(StoreError):
    """The store was built from other weights, data or settings than the caller expects."""


class CorruptStoreError(StoreError):
    """Stored bytes are missing or fail their checksum."""


class StoreWriteError(StoreError):
    """A write was refused (wrong shape or dtype) or failed (disk full, I/O error)."""


class NonFiniteActivationsError(StoreWriteError):
    """Activations handed to a store hold NaN or inf: refused, so a store never holds them and
    the fill value of never-written data (NaN) keeps meaning "missing"."""


class StoreUnreachableError(StoreError, ConnectionError):
    """The store's location cannot be used at all: endpoint down, bucket missing, access denied."""
