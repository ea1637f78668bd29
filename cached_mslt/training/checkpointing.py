"""Mid-phase checkpoints: where a phase stands (`TrainProgress`, saved by Accelerate beside
the model, optimizer and RNG states) and writing a checkpoint so a crash never leaves a
half-written one (docs/reliability.md)."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from cached_mslt.rundir import saving, write_atomic
from cached_mslt.training.metrics import RunClock

# What Accelerate names the first object registered for checkpointing (our TrainProgress).
PROGRESS_FILE = "custom_checkpoint_0.pkl"
# Size and SHA-256 of every file of a checkpoint, written last at save, checked at resume.
CHECKSUMS_FILE = "checksums.json"
LEGACY_TRAINER_STATE = "trainer_state.json"  # the format before TrainProgress


class OldCheckpointError(RuntimeError):
    """A mid-phase checkpoint written in a format this version cannot resume from."""


@dataclass
class TrainProgress:
    """Where a phase stands. Registered with `accelerator.register_for_checkpointing`, so
    `save_state`/`load_state` carry it beside the model, optimizer and RNG states."""

    clock: RunClock
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    clock_at_start: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "clock": self.clock.to_dict(),
            "clock_at_start": self.clock_at_start,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch = state["step"], state["epoch"]
        self.batches_in_epoch = state["batches_in_epoch"]
        self.clock_at_start = state["clock_at_start"]
        for k, v in state["clock"].items():
            setattr(self.clock, k, v)


# One progress object per Accelerator: registered objects stay registered for its lifetime
# (free_memory keeps them), so every phase it runs reuses the same one.
_PROGRESS: weakref.WeakKeyDictionary[Accelerator, TrainProgress] = weakref.WeakKeyDictionary()


def start_progress(accelerator: Accelerator, clock: RunClock) -> TrainProgress:
    """The accelerator's progress object, reset to the start of a phase at `clock`."""
    progress = _PROGRESS.get(accelerator)
    if progress is None:
        progress = _PROGRESS[accelerator] = TrainProgress(clock)
        accelerator.register_for_checkpointing(progress)
    progress.clock, progress.step, progress.epoch, progress.batches_in_epoch = clock, 0, 0, 0
    progress.clock_at_start = clock.to_dict()
    return progress


def has_checkpoint(directory: Path | None) -> bool:
    """A complete checkpoint (save_state writes the registered progress last)."""
    if directory is None:
        return False
    if (directory / LEGACY_TRAINER_STATE).exists() and not (directory / PROGRESS_FILE).exists():
        raise OldCheckpointError(
            f"{directory} was written by an older version (trainer_state.json), which this "
            f"version cannot resume; restart the phase from its beginning: rm -rf {directory}"
        )
    return (directory / PROGRESS_FILE).exists()


def save_checkpoint(accelerator: Accelerator, directory: Path) -> None:
    """save_state into a temporary dir, then swap it in: a crash mid-save leaves the
    previous checkpoint intact."""
    tmp = directory.with_name(directory.name + ".tmp")
    with saving(tmp, "checkpoint"):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank has written its RNG state before the swap
    if accelerator.is_main_process:
        with saving(tmp, "checkpoint"):
            write_atomic(tmp / CHECKSUMS_FILE, json.dumps(file_checksums(tmp), indent=1))
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    accelerator.wait_for_everyone()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_checksums(directory: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> size and SHA-256 of every file of a checkpoint directory."""
    return {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != CHECKSUMS_FILE
    }


def checkpoint_problem(directory: Path) -> str | None:
    """What is wrong with a checkpoint's files (flipped bytes, truncation, a lost file),
    measured against the checksums written at save; None if every file matches."""
    try:
        recorded = json.loads((directory / CHECKSUMS_FILE).read_text())
    except (OSError, ValueError):
        return f"{CHECKSUMS_FILE} is missing or unreadable (expected one in every checkpoint)"
    for name, want in recorded.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{name} is {size} bytes, expected {want['bytes']} (truncated or overwritten)"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its SHA-256 recorded at save (flipped bytes)"
    return None


def usable_checkpoint(accelerator: Accelerator, directory: Path | None, phase: str) -> bool:
    """A checkpoint to resume from: complete and every file as it was saved. A damaged
    one is moved aside (to `<dir>.corrupt`, replacing an older one) and the phase restarts
    from its beginning: resuming from bad weights or optimizer moments would finish a
    stage that looks done with a model nobody trained (docs/reliability.md)."""
    if not has_checkpoint(directory):
        return False
    problem = [checkpoint_problem(directory) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(problem, from_process=0)
    if problem[0] is None:
        return True
    aside = directory.with_name(directory.name + ".corrupt")
    if accelerator.is_main_process:
        shutil.rmtree(aside, ignore_errors=True)
        directory.rename(aside)
        warnings.warn(
            f"{phase}: checkpoint {directory} is corrupt: {problem[0]}. Not resuming from it: "
            f"the phase restarts from its beginning. The damaged copy is kept in {aside} "
            f"(`rm -rf {aside}` once you have looked at it)",
            stacklevel=2,
        )
    accelerator.wait_for_everyone()
    return False
