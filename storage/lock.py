"""The build lock: one build at a time per store.

The lock is a small JSON key `build.lock` at the store root, created only if absent
(`storage.remote.create_exclusive`). That is atomic on local paths (Zarr's LocalStore
links a temporary file into place) and on S3 APIs that honour `If-None-Match: *` (AWS S3,
moto; s3fs sends it): two concurrent builds cannot both win. On other fsspec URLs it is
exists-then-set, so there the lock catches a forgotten second build, not a simultaneous
one. Either way correctness of the data does not rest on the lock: every shard has one
owning process (s % world_size) and each object is written whole by that owner.

Taking over a dead holder's lock (same host, process gone) is delete-then-create: two
builds resuming the same crashed build at the same instant can both pass. Do not do that.

The lock belongs to a process (host + pid), not to a handle: the rank-0 process that
created the store may commit it through another handle (e.g. its mode="r+" one).
"""

from __future__ import annotations

import json
import os
import socket
import uuid
import warnings
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from storage.errors import StoreLockedError
from storage.remote import create_exclusive

LOCK_KEY = "build.lock"


@dataclass(frozen=True)
class BuildLock:
    host: str
    pid: int
    build_id: str
    created_at: str

    @classmethod
    def new(cls) -> BuildLock:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex, now)

    def describe(self) -> str:
        return (
            f"pid {self.pid} on host {self.host} (build {self.build_id}, since {self.created_at})"
        )

    def is_this_process(self) -> bool:
        return self.host == socket.gethostname() and self.pid == os.getpid()

    def is_stale(self) -> bool:
        """Held by a process of this host that no longer runs (other hosts: unknowable)."""
        return self.host == socket.gethostname() and not _pid_alive(self.pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    # A killed child that nobody reaped yet is a zombie: it answers kill(0) but is gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_lock(store: Store) -> BuildLock | None:
    """The current holder; None when unlocked. Raises StoreLockedError if unreadable."""
    buf = sync(store.get(LOCK_KEY, default_buffer_prototype()))
    if buf is None:
        return None
    try:
        return BuildLock(**json.loads(buf.to_bytes()))
    except (ValueError, TypeError) as e:
        raise StoreLockedError(
            f"the build lock {LOCK_KEY!r} of {store} is unreadable ({e}); if no build is "
            f"running, delete that file and retry"
        ) from e


def locked_error(where: str, holder: BuildLock) -> StoreLockedError:
    if holder.is_this_process():
        return StoreLockedError(
            f"{where}: this process already holds its build lock ({holder.describe()}): an "
            f"earlier create neither committed nor called release_lock(). Commit or release "
            f"that build first."
        )
    return StoreLockedError(
        f"{where} is being built by {holder.describe()}. Wait for that build to finish; if "
        f"that process is gone (e.g. it ran on another host), delete "
        f"{where.rstrip('/')}/{LOCK_KEY} and retry."
    )


def acquire_lock(store: Store, where: str) -> BuildLock:
    """Take the lock for this process; take over a lock whose holder died on this host."""
    mine = BuildLock.new()
    payload = json.dumps(asdict(mine)).encode()
    for _ in range(3):
        create_exclusive(store, LOCK_KEY, payload)
        holder = read_lock(store)
        if holder == mine:
            return mine
        if holder is None:
            continue  # released between our write and our read: try again
        if not holder.is_stale():
            raise locked_error(where, holder)
        warnings.warn(
            f"{where}: taking over the build lock of {holder.describe()}, a process that no "
            f"longer runs (a crashed build; resuming it)",
            stacklevel=3,
        )
        sync(store.delete(LOCK_KEY))
    raise StoreLockedError(
        f"{where}: could not take the build lock; another build is racing for it"
    )


def release_lock(store: Store) -> None:
    """Delete the lock if this process holds it (another holder's lock is left alone)."""
    holder = read_lock(store)
    if holder is not None and holder.is_this_process():
        sync(store.delete(LOCK_KEY))
