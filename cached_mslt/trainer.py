"""The one training loop. Every stage and every method runs through `train_phase`.

A phase is a stretch of training with a fixed set of trainable parameters: an MSLT stage,
the full-model baseline, a level of a V-cycle. Hidden states come from the activation
store (cached), from the frozen bottom run live under no_grad (`cache: never`), or the
trainable part starts at the token ids (nothing frozen); the step after that is the same.
"""

from __future__ import annotations

import math
import shutil
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from cached_mslt.budget import PhaseShare, lr_factor
from cached_mslt.config import RunArgs
from cached_mslt.metrics import MetricsWriter, RunClock, Stopwatch
from cached_mslt.model import (
    TopModel,
    bottom_forward,
    decay_param_groups,
    freeze_bottom,
    frozen_modules,
)
from cached_mslt.rundir import saving
from storage import make_block_loader
from storage.dataset import Blocks

# What Accelerate names the first object registered for checkpointing (our TrainProgress).
PROGRESS_FILE = "custom_checkpoint_0.pkl"
LEGACY_TRAINER_STATE = "trainer_state.json"  # the format before TrainProgress


class DivergenceError(RuntimeError):
    """Training produced non-finite losses or gradients for too many steps in a row."""


@dataclass
class Phase:
    name: str  # "stage-2", "full", ...: the `stage` field of every metrics line
    model: nn.Module  # the whole model; the phase decides what of it trains
    frozen_layers: int  # 0: everything trains, from token ids
    steps: int  # optimizer steps (with `share`: an upper bound)
    blocks: Blocks  # store BlockDataset or PreparedBlocks: the same rows, ids or hidden states
    cached: bool  # blocks hold hidden states (else token ids)
    learning_rate: float
    warmup_fraction: float  # of the phase: linear warmup, then decay to zero
    lr_schedule: str = "linear"
    # Set when the phase trains on a share of a budget (tokens, wall-clock or FLOPs): it ends
    # when the share is spent, and its learning rate follows its progress through it.
    share: PhaseShare | None = None
    checkpoint_dir: Path | None = None  # mid-phase save_state (resume)
    # Methods hook in here: PLD sets its keep probability, counts what a step costs.
    before_step: Callable[[int], None] | None = None
    trainable: nn.Module | None = None  # default: TopModel(model, frozen_layers)
    # Called on the fresh optimizer before `prepare` (share-unshare hands state over here).
    init_optimizer: Callable[[torch.optim.Optimizer], None] | None = None
    optimizer: torch.optim.Optimizer | None = None  # set by train_phase: the one it trained with
    flops_per_step: Callable[[dict[str, int]], float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # written into every metrics line


def set_modes(model: nn.Module, frozen_layers: int) -> None:
    """Train mode for what trains; the frozen bottom stays in eval mode (dropout off)."""
    model.train()
    for m in frozen_modules(model, frozen_layers):
        m.eval()


@torch.no_grad()
def validation_loss(
    whole_model_loss: nn.Module, accelerator: Accelerator, valid, batch_rows: int, max_batches=None
) -> float:
    """Validation MLM loss of the whole model, live, token-weighted over every masked
    position of the split. `whole_model_loss` maps (labels, attention_mask, input_ids) to
    (mean loss, masked count), as the trainable module of a phase with nothing frozen
    does. Process r takes rows r, r + world, ...: exact, no padding."""
    was_training = whole_model_loss.training
    whole_model_loss.eval()
    device = accelerator.device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    rows = range(accelerator.process_index, len(valid), accelerator.num_processes)
    for i, start in enumerate(range(0, len(rows), batch_rows)):
        if max_batches is not None and i >= max_batches:
            break
        batch = valid[list(rows[start : start + batch_rows])]
        loss, n = whole_model_loss(
            torch.as_tensor(batch["labels"], device=device, dtype=torch.long),
            torch.as_tensor(batch["attention_mask"], device=device),
            input_ids=torch.as_tensor(batch["input_ids"], device=device),
        )
        total += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=device)
    total = accelerator.reduce(total, reduction="sum")
    whole_model_loss.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else math.nan


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


@dataclass
class _Window:
    """What the steps since the last log line accumulated (losses summed over all ranks)."""

    loss_sum: float = 0.0
    masked: int = 0
    finite: bool = True  # every micro-batch of the current optimizer step so far
    nonfinite_run: int = 0  # consecutive skipped optimizer steps
    grad_norm: float | None = None
    last_loss_sum: float = 0.0


class _PhaseLoop:
    """One phase's training, in the shape of the Accelerate examples: build (optimizer,
    scheduler, loader, prepare), resume, then per batch `train_step` and, per optimizer
    step, `end_step` (clock, schedule, stop, evaluate, log, checkpoint)."""

    def __init__(self, accelerator, phase: Phase, args: RunArgs, clock, metrics, valid):
        self.accelerator, self.phase, self.t = accelerator, phase, args.train
        self.args, self.clock, self.metrics, self.valid = args, clock, metrics, valid
        model = phase.model
        self.params = freeze_bottom(model, phase.frozen_layers)
        trainable = phase.trainable or TopModel(model, phase.frozen_layers)
        # Validation always runs the whole model: the trainable module itself when nothing
        # is frozen (it starts at token ids), else the same model seen from the embeddings.
        self.whole_model_loss = trainable if phase.frozen_layers == 0 else TopModel(model, 0)
        self.progress = start_progress(accelerator, clock)
        optimizer, scheduler = self._optimizer()
        loader = make_block_loader(
            phase.blocks,
            rows_per_batch=self.t.batch_size,
            shuffle=True,
            seed=self.t.seed,
            num_workers=self.t.num_workers,
        )
        self.trainable, self.optimizer, self.loader, self.scheduler = accelerator.prepare(
            trainable, optimizer, loader, scheduler
        )
        model.to(accelerator.device)  # the frozen bottom lives outside the prepared module's DDP
        self.window, self.last_val = _Window(), None
        budget = phase.share.budget if phase.share else None
        self.watches_time = self.t.max_wall_s is not None or bool(
            budget and (budget.wall_s or budget.cpu_s)
        )

    def _optimizer(self) -> tuple[torch.optim.Optimizer, LambdaLR]:
        phase, t = self.phase, self.t
        optimizer = torch.optim.AdamW(
            decay_param_groups(phase.model, t.weight_decay, self.params),
            lr=phase.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_epsilon,
        )
        if phase.init_optimizer is not None:
            phase.init_optimizer(optimizer)
        phase.optimizer = optimizer
        # The learning rate follows the phase's progress: steps done over steps planned, or
        # the share of its budget spent. One rule for both, and it ignores LambdaLR's step
        # count, which Accelerate advances once per process each step.
        self.lr_progress = phase.share.progress(self.clock) if phase.share else 0.0
        scheduler = LambdaLR(
            optimizer,
            lambda _: lr_factor(self.lr_progress, phase.warmup_fraction, phase.lr_schedule),
        )
        return optimizer, scheduler

    def done_fraction(self) -> float:
        share = self.phase.share
        return share.progress(self.clock) if share else self.progress.step / self.phase.steps

    def out_of_budget(self) -> bool:
        """The run's wall-clock or the phase's share of a budget is used up."""
        wall = self.t.max_wall_s
        return (wall is not None and self.clock.wall_s >= wall) or (
            self.phase.share is not None and self.lr_progress >= 1.0
        )

    def resume(self) -> None:
        """Continue from the phase's checkpoint, if it has one."""
        phase = self.phase
        if has_checkpoint(phase.checkpoint_dir):
            self.accelerator.load_state(str(phase.checkpoint_dir))  # restores self.progress
            self.accelerator.print(
                f"{phase.name}: resumed at step {self.progress.step}/{phase.steps}"
            )
        # Lines past where this phase starts (or resumes) are from an attempt that crashed:
        # they will be written again, so each step is logged at most once.
        self.metrics.truncate_after(phase.name, self.clock.step)
        self.lr_progress = self.done_fraction()  # where a resumed phase stands

    def train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward, backward and (at an accumulation boundary) the optimizer step of one
        batch; returns [tokens, masked tokens, loss sum] summed over all ranks."""
        accelerator, phase, w = self.accelerator, self.phase, self.window
        if phase.before_step is not None:
            phase.before_step(self.progress.step)
        with accelerator.accumulate(self.trainable):
            inputs = _phase_inputs(phase.model, phase, batch)
            loss, n_masked = self.trainable(batch["labels"], batch["attention_mask"], **inputs)
            accelerator.backward(loss)
            # Reduced before the step so every rank takes the same skip decision.
            counts = accelerator.reduce(
                torch.tensor(
                    [int(batch["attention_mask"].sum()), n_masked, loss.item() * n_masked],
                    dtype=torch.float64,
                    device=accelerator.device,
                ),
                reduction="sum",
            )
            w.finite = w.finite and math.isfinite(float(counts[2]))
            w.grad_norm = None
            if accelerator.sync_gradients and self.t.max_grad_norm > 0:
                w.grad_norm = float(accelerator.clip_grad_norm_(self.params, self.t.max_grad_norm))
                # Under fp16 the loss scaler skips overflowing steps itself and inf norms
                # while it calibrates are expected: only the loss counts there.
                if accelerator.scaler is None:
                    w.finite = w.finite and math.isfinite(w.grad_norm)
            # A non-finite step is skipped, never applied: one bad batch does not poison
            # the weights, and `nonfinite_patience` bad steps in a row stop the stage.
            if w.finite or not accelerator.sync_gradients:
                self.optimizer.step()
            self.optimizer.zero_grad()
        return counts

    def count(self, counts: torch.Tensor) -> None:
        """Charge a batch to the clock and the log window."""
        self.clock.tokens += int(counts[0])
        self.window.loss_sum += float(counts[2])
        self.window.masked += int(counts[1])
        self.window.last_loss_sum = float(counts[2])
        if self.phase.flops_per_step is not None:
            self.clock.flops += self.phase.flops_per_step(
                {"tokens": int(counts[0]), "masked": int(counts[1])}
            )

    def end_step(self) -> bool:
        """After an optimizer step: advance the clock and schedule, decide (on every rank
        alike) whether to stop, evaluate, log and checkpoint. Returns True on the last step."""
        self.progress.step += 1
        self.clock.step += 1
        self.bar.update(1)
        w = self.window
        w.nonfinite_run = 0 if w.finite else w.nonfinite_run + 1
        w.finite = True
        if w.nonfinite_run >= self.t.nonfinite_patience:
            raise _diverged(
                self.phase,
                self.progress.step,
                w.nonfinite_run,
                w.last_loss_sum,
                w.grad_norm,
                self.args,
            )
        if self.watches_time:
            # Every rank takes the slowest rank's clock, so all see the same progress and
            # learning rate, and stop at the same step (else the next all-reduce would hang).
            self.watch.tick()
            times = torch.tensor(
                [self.clock.wall_s, self.clock.cpu_s],
                dtype=torch.float64,
                device=self.accelerator.device,
            )
            times = self.accelerator.reduce(times, reduction="max").tolist()
            self.clock.wall_s, self.clock.cpu_s = times
        self.lr_progress = self.done_fraction()
        self.scheduler.step()  # the next step's rate
        if self.out_of_budget():
            self.accelerator.set_trigger()
        self.stopped = self.accelerator.check_trigger()
        last = self.progress.step == self.phase.steps or self.stopped
        self.evaluate_and_log(last)
        self.maybe_checkpoint()
        return last

    def evaluate_and_log(self, last: bool) -> None:
        t, step = self.t, self.progress.step
        record: dict[str, Any] = {}
        if step % t.eval_every == 0 or last:
            with self.watch.paused():  # evaluation is not training time, for any method
                self.last_val = validation_loss(
                    self.whole_model_loss,
                    self.accelerator,
                    self.valid,
                    t.batch_size,
                    t.eval_batches,
                )
            set_modes(self.phase.model, self.phase.frozen_layers)
            record["val_loss"] = self.last_val
        if step % t.log_every == 0 or record or last:
            self.watch.tick()
            record.update(
                step=self.clock.step,
                tokens=self.clock.tokens,
                wall_s=round(self.clock.wall_s, 3),
                cpu_s=round(self.clock.cpu_s, 3),
                flops=self.clock.flops,
                train_loss=self.window.loss_sum / max(self.window.masked, 1),
                lr=self.scheduler.get_last_lr()[0],
                stage=self.phase.name,
                **self.phase.extra,
            )
            self.metrics.log(record)
            self.bar.set_postfix(loss=f"{record['train_loss']:.3f}")
            self.window.loss_sum, self.window.masked = 0.0, 0

    def maybe_checkpoint(self) -> None:
        phase, step = self.phase, self.progress.step
        if (
            phase.checkpoint_dir is not None
            and step % self.t.checkpoint_every == 0
            and step < phase.steps
            and self.window.nonfinite_run == 0
            and _all_finite(self.params)  # never checkpoint weights a resume cannot use
        ):
            self.watch.tick()
            save_checkpoint(self.accelerator, phase.checkpoint_dir)

    def run(self) -> dict[str, Any]:
        """Epochs until the phase's steps or budget are used up; returns its statistics."""
        p, phase = self.progress, self.phase
        self.resume()
        self.watch = Stopwatch(self.clock)
        set_modes(phase.model, phase.frozen_layers)
        self.bar = tqdm(
            total=None if phase.share else phase.steps,
            initial=p.step,
            desc=phase.name,
            unit="step",
            disable=not self.accelerator.is_local_main_process,
        )
        self.stopped = self.out_of_budget()
        while p.step < phase.steps and not self.stopped:
            if self.run_epoch():
                break
        self.bar.close()
        self.watch.tick()
        self.accelerator.wait_for_everyone()
        return self.stats()

    def run_epoch(self) -> bool:
        """The rest of the current epoch (a resumed one skips what it already trained on);
        True if the phase ended inside it."""
        p, loader = self.progress, self.loader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(p.epoch)
        if p.batches_in_epoch:
            loader = self.accelerator.skip_first_batches(loader, p.batches_in_epoch)
        for batch in loader:
            p.batches_in_epoch += 1
            self.count(self.train_step(batch))
            if self.accelerator.sync_gradients and self.end_step():
                return True
        p.epoch += 1
        p.batches_in_epoch = 0
        return False

    def stats(self) -> dict[str, Any]:
        p, start = self.progress, self.progress.clock_at_start
        stats = {
            "steps": p.step,
            "stopped_by_wall_budget": self.stopped,
            "epochs": p.epoch + p.batches_in_epoch / max(len(self.loader), 1),
            "train_s": self.clock.wall_s - start["wall_s"],
            "tokens": self.clock.tokens - start["tokens"],
            "val_loss": self.last_val,
        }
        stats["tokens_per_s"] = stats["tokens"] / stats["train_s"] if stats["train_s"] > 0 else None
        return stats


def train_phase(
    accelerator: Accelerator,
    phase: Phase,
    args: RunArgs,
    clock: RunClock,
    metrics: MetricsWriter,
    valid,
) -> dict[str, Any]:
    """Train one phase to its step budget, resuming from `phase.checkpoint_dir` if it holds
    a checkpoint. Advances `clock`; returns the phase's own statistics."""
    if accelerator.device.type == "cpu":
        # AdamW's second moments start denormal; x86 CPUs run those ops ~2x slower, which
        # would penalise methods by their trainable parameter count.
        torch.set_flush_denormal(True)
    stats = _PhaseLoop(accelerator, phase, args, clock, metrics, valid).run()
    accelerator.free_memory()  # fresh model/optimizer/loader objects for the next phase
    return stats


def _all_finite(params: list[nn.Parameter]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def _diverged(
    phase: Phase, step: int, run: int, loss_sum: float, grad_norm: float | None, args: RunArgs
) -> DivergenceError:
    norm = "not measured (--max_grad_norm 0)" if grad_norm is None else f"{grad_norm}"
    return DivergenceError(
        f"{phase.name} diverged: {run} consecutive optimizer steps up to step {step} had a "
        f"non-finite loss or gradient norm (last loss sum {loss_sum}, gradient norm {norm}); "
        f"expected finite values (--nonfinite_patience {args.train.nonfinite_patience}). The "
        f"phase is not marked done; retrain it with a lower --learning_rate (now "
        f"{args.train.learning_rate})."
    )


def _phase_inputs(model: nn.Module, phase: Phase, batch: dict) -> dict[str, torch.Tensor]:
    if phase.frozen_layers == 0:
        return {"input_ids": batch["input_ids"]}
    if phase.cached:
        # 16-bit stores are widened here; the top always computes in float32 (or autocast).
        return {"hidden_states": batch["hidden"].float()}
    with torch.no_grad():
        return {
            "hidden_states": bottom_forward(
                model, batch["input_ids"], batch["attention_mask"], phase.frozen_layers
            )
        }
