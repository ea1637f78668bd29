"""The run directory: where everything of a run lives, one owner per stage, files that are whole.

    <run>/config.json              the run's configuration
    <run>/run_identity.json        the options later stages must agree with (the contract)
    <run>/metrics.jsonl            one line per log step, all stages (or phases)
    <run>/stage-K/model/           save_pretrained checkpoint (plus tokenizer) at stage end
    <run>/stage-K/checkpoint/      accelerate save_state for resuming mid-stage (removed at end)
    <run>/stage-K/owner.lock       the stage's owner while it runs
    <run>/stage-K/manifest.json    written last: the stage is done when it exists
    <run>/cache/stage-K/           stage K's activation store (or <cache_url>/stage-K)
    <run>/summary.md, val_loss.png the end-of-run report
    <run>/final/, result.json      a comparison method's final model and outcome

Writers (stages, the comparison harness) and readers (inspect, evaluation, compare) all
ask a `RunLayout` for paths instead of joining strings.

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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CONFIG = "config.json"
MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
RESULT = "result.json"
LOCK_FILE = "owner.lock"
STAGE_PREFIX = "stage-"


@dataclass(frozen=True)
class RunLayout:
    root: Path
    cache_url: str | None = None  # --cache_url: stores live there instead of <run>/cache

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, args: Any) -> RunLayout:
        """The layout of the run `args` (a RunArgs) writes."""
        return cls(Path(args.train.run_dir), args.schedule.cache_url)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunLayout | None:
        """The run that wrote a checkpoint: the nearest of its parent (a method's `final/`)
        and grandparent (a stage's `stage-K/model/`) that holds a config.json."""
        for parent in Path(checkpoint).resolve().parents[:2]:
            if (parent / CONFIG).is_file():
                return cls(parent)
        return None

    @classmethod
    def of_store(cls, url: str) -> RunLayout | None:
        """The run a local store at `<run>/cache/stage-K` belongs to, if it is one."""
        path = Path(url)
        if "://" in url or path.parent.name != "cache":
            return None
        run = cls(path.parent.parent)
        return run if run.config.is_file() else None

    # --- files of the run -------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def identity(self) -> Path:
        """The run's contract: the options that shape its plan, model and data, as first
        written (config.json can be edited and passed back with --config)."""
        return self.root / "run_identity.json"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def peak(self) -> Path:
        """The FLOP/s the run's MFU is measured against (cached_mslt.training.flops.Peak)."""
        return self.root / "peak.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.md"

    @property
    def loss_plot(self) -> Path:
        return self.root / "val_loss.png"

    @property
    def result(self) -> Path:
        return self.root / RESULT

    @property
    def final_model(self) -> Path:
        return self.root / "final"

    def read_config(self) -> dict[str, Any] | None:
        return json.loads(self.config.read_text()) if self.config.is_file() else None

    def read_result(self) -> dict[str, Any] | None:
        return json.loads(self.result.read_text()) if self.result.is_file() else None

    # --- stages ---------------------------------------------------------------------------

    def stage_dir(self, index: int) -> Path:
        return self.root / f"{STAGE_PREFIX}{index}"

    def model_dir(self, index: int) -> Path:
        return self.stage_dir(index) / "model"

    def checkpoint_dir(self, index: int) -> Path:
        return self.stage_dir(index) / "checkpoint"

    def manifest(self, index: int) -> Path:
        return self.stage_dir(index) / MANIFEST

    def lock(self, index: int) -> Path:
        return self.stage_dir(index) / LOCK_FILE

    def read_manifest(self, index: int) -> dict[str, Any] | None:
        path = self.manifest(index)
        return json.loads(path.read_text()) if path.exists() else None

    def stages(self) -> list[dict[str, Any]]:
        """Manifests of the finished stages, in stage order."""
        found = [json.loads(p.read_text()) for p in self.root.glob(f"{STAGE_PREFIX}*/{MANIFEST}")]
        return sorted(found, key=lambda m: m["stage"]["index"])

    # --- stores ---------------------------------------------------------------------------

    def local_store(self, index: int) -> Path:
        """Stage K's store in the run's own directory (where it is unless --cache_url)."""
        return self.root / "cache" / f"{STAGE_PREFIX}{index}"

    def store_url(self, index: int) -> str:
        """Stage K's store: under --cache_url (any fsspec URL) or <run>/cache."""
        if self.cache_url:
            return f"{self.cache_url.rstrip('/')}/{STAGE_PREFIX}{index}"
        return str(self.local_store(index))

    def probe_url(self) -> str:
        """Where a stage measures its store's bandwidth (`storage/bandwidth.py`): beside
        the stores, under a name no stage's store has."""
        return f"{self.cache_url.rstrip('/') if self.cache_url else self.root / 'cache'}/.probe"

    def local_stores(self) -> dict[int, Path]:
        """Stage index -> store directory, for every store under <run>/cache."""
        dirs = (self.root / "cache").glob(f"{STAGE_PREFIX}*")
        return {int(d.name.removeprefix(STAGE_PREFIX)): d for d in sorted(dirs)}


# --- one owner per stage, whole files ----------------------------------------------------


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


def append_line(path: Path, line: str) -> None:
    """Append `line` (and a newline) whole or not at all: a write cut short (disk full) is
    taken back, so the file ends where it did, and the error names the file and its free
    space. A torn tail left by a killed writer is ended first, so it stays one unreadable
    line that readers skip instead of gluing itself to this one (docs/reliability.md)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        torn_tail = start > 0 and os.pread(fd, 1, start - 1) != b"\n"
        data = ("\n" if torn_tail else "").encode() + line.encode() + b"\n"
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError as e:
            os.ftruncate(fd, start)
            raise _append_error(path, e) from e
    finally:
        os.close(fd)


def _append_error(path: Path, e: OSError) -> OSError:
    free = _free_bytes(path.parent) / 2**20
    what = "no space left on the device" if _is_disk_full(e) else e.strerror or str(e)
    message = (
        f"appending a line to {path} failed: {what} ({free:.1f} MiB free there; expected room "
        f"for one line). The file is as it was before this line. Free space (or use another "
        f"--run_dir), then rerun the same command: the stage resumes from its last checkpoint"
    )
    return DiskFullError(errno.ENOSPC, message) if _is_disk_full(e) else OSError(e.errno, message)


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


def owner_record(what: str) -> dict[str, Any]:
    """What identifies a lock's owner: host, pid, start time, the stage and the program's
    name. Never the command line: its flags can carry credentials
    (`--cache_storage_options`), and a lock outlives a SIGKILLed owner and is printed to
    whoever is refused by it (docs/reliability.md, secrets)."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
        "what": what,
        "program": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
    }


def acquire(path: Path, what: str) -> str | None:
    """Take the lock at `path` for this process; return None, or why it cannot be taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = owner_record(what)
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
                f"{holder.get('since')} ({holder.get('program', 'an older version')}) owns {path}. Expected no "
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
