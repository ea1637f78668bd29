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

import errno
import json
import os
import shutil
import socket
import sys
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path


class RunLockedError(RuntimeError):
    """Another process owns this run directory's stage."""


class DiskFullError(OSError):
    """A checkpoint or model could not be saved: no space left where it goes."""


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    # torch.save reports a short write as "[enforce fail at inline_container.cc] unexpected
    # pos ..." or "file write failed", safetensors as "I/O error: No space left on device
    # (os error 28)", neither with an errno attribute.
    text = str(e)
    return any(
        s in text for s in ("No space left", "os error 28", "unexpected pos", "file write failed")
    )


def _free_bytes(path: Path) -> int:
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return 0


@contextmanager
def saving(tmp: Path, what: str) -> Iterator[None]:
    """Around a save into the temporary `tmp`: on failure remove it (a half-written dir must
    not look like a checkpoint), and say "disk full" in words when that is the cause."""
    try:
        yield
    except Exception as e:  # safetensors raises its own SafetensorError on a full disk
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if not _is_disk_full(e):
            raise
        free = _free_bytes(tmp.parent)
        raise DiskFullError(
            errno.ENOSPC,
            f"saving the {what} into {tmp.parent} failed: no space left on the device "
            f"({free / 2**20:.1f} MiB free there; expected room for the {what}). The partial "
            f"{tmp.name} was removed and the previous one is intact. Free space (or use another "
            f"--run_dir), then rerun the same command: the stage resumes from its last "
            f"checkpoint",
        ) from e


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old file or the
    new one, never a torn one (a crash mid-write leaves only the temporary)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with saving(tmp, path.name):
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
