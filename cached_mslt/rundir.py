"""What keeps a run directory consistent: one owner per stage, and files that are whole.

The stage lock is a small JSON file `stage-K/owner.lock`, created only if absent
(O_CREAT | O_EXCL: atomic on local disks and on NFS v3+). It is taken before a stage looks
at its own state and released after its manifest is written, so a second command on the
same run and stage is refused instead of training beside the first. The N ranks of one job
share it: rank 0 takes it and tells the others the outcome. A lock whose holder died on
this host (SIGKILL, OOM) is taken over; one from another host cannot be judged from here,
so the message names the file to delete.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

LOCK_FILE = "owner.lock"


class RunLockedError(RuntimeError):
    """Another process owns this run directory's stage."""


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old file or the
    new one, never a torn one (a crash mid-write leaves only the temporary)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _alive(host: str, pid: int) -> bool:
    if host != socket.gethostname():
        return True  # unknowable from here: assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child nobody reaped yet is a zombie: it answers kill(0) but is gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _try_create(path: Path, payload: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(payload)
    return True


def acquire(path: Path, what: str) -> str | None:
    """Take the lock at `path` for this process; return None, or why it cannot be taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    for _ in range(3):
        if _try_create(path, json.dumps(mine)):
            return None
        try:
            holder = json.loads(path.read_text())
            host, pid = holder["host"], int(holder["pid"])
        except FileNotFoundError:
            continue  # released between our create and our read
        except (ValueError, KeyError, TypeError):
            # A holder killed between create and write leaves an empty file.
            holder, host, pid = {}, socket.gethostname(), -1
        if pid == os.getpid() and host == socket.gethostname():
            return f"{what}: this process already holds {path}"
        if _alive(host, pid):
            return (
                f"{what} is already running: pid {pid} on host {host} since "
                f"{holder.get('since')} (`{holder.get('command')}`) owns {path}. Expected no "
                f"other owner; wait for it to finish, or if that process is gone (it ran on "
                f"another host), `rm {path}` and rerun"
            )
        warnings.warn(
            f"{what}: taking over {path} from pid {pid}, which no longer runs", stacklevel=2
        )
        path.unlink(missing_ok=True)
    return f"{what}: could not take {path}; another command is racing for it"


@contextmanager
def stage_lock(accelerator, path: Path, what: str) -> Iterator[None]:
    """Hold `path` for this job (rank 0 takes it for all ranks) inside the block."""
    from accelerate.utils import broadcast_object_list

    problem = [acquire(path, what) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(problem, from_process=0)
    if problem[0] is not None:
        raise RunLockedError(problem[0])
    try:
        yield
    finally:
        if accelerator.is_main_process:
            try:
                if json.loads(path.read_text()).get("pid") == os.getpid():
                    path.unlink()
            except (OSError, ValueError):
                pass
