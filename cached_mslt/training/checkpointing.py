"""Mid-phase checkpoints: where a phase stands (`TrainProgress`, saved by Accelerate beside
the model, optimizer and RNG states) and writing a checkpoint so a crash never leaves a
half-written one (docs/reliability.md)."""

from __future__ import annotations

import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from cached_mslt.rundir import saving
from cached_mslt.training.metrics import RunClock

# What Accelerate names the first object registered for checkpointing (our TrainProgress).
PROGRESS_FILE = "custom_checkpoint_0.pkl"
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
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    accelerator.wait_for_everyone()
