"""The one training loop. Every stage and every method runs through `train_phase`.

A phase is a stretch of training with a fixed set of trainable parameters: an MSLT stage,
the full-model baseline, a level of a V-cycle. Hidden states come from the activation
store (cached), from the frozen bottom run live under no_grad (`cache: never`), from a
`BatchFill` that reads what a store has and computes the rest (write-through), or the
trainable part starts at the token ids (nothing frozen); the step after that is the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from cached_mslt.config import RunArgs
from cached_mslt.models import (
    TopModel,
    bottom_forward,
    decay_param_groups,
    freeze_bottom,
    frozen_modules,
)
from cached_mslt.training.budget import PhaseShare, lr_factor
from cached_mslt.training.checkpointing import (
    save_checkpoint,
    start_progress,
    usable_checkpoint,
)
from cached_mslt.training.metrics import MetricsWriter, RunClock, Stopwatch
from cached_mslt.training.step_counts import (
    BatchCounts,
    Read,
    Tally,
    Window,
    host_batch,
    padded_gather_per_row,
)
from storage import Blocks, make_block_loader

# Devices whose AdamW has the fused kernel that honours `found_inf` (torch 2.13).
FUSED_ADAMW_DEVICES = ("cpu", "cuda", "mps", "xpu")


class DivergenceError(RuntimeError):
    """Training produced non-finite losses or gradients for too many steps in a row."""


class BatchFill(Protocol):
    """Where a phase's hidden states come from when it is neither live nor a complete
    store (cached_mslt/stages/write_through.py): `plan` sees the host batch before it
    moves, `hidden` returns the frozen bottom's output for it inside the step."""

    def plan(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]: ...

    def hidden(self, batch: dict[str, Any]) -> torch.Tensor: ...


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
    decay_fraction: float = 0.2  # wsd: the final share of the curve that decays
    # The part of one learning-rate curve this phase covers: (0, 1) warms up and decays
    # within the phase; a stage of a run-wide schedule continues where the last one ended.
    lr_span: tuple[float, float] = (0.0, 1.0)
    data_seed: int | None = None  # the loader's shuffle; default --seed
    fill: BatchFill | None = None  # write-through: the hidden states of blocks of token ids
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
        total[0] += loss.detach().double() * n  # read once, after the last batch
        total[1] += n
    loss_sum, count = accelerator.reduce(total, reduction="sum").tolist()
    whole_model_loss.train(was_training)
    return loss_sum / count if count > 0 else math.nan


class _PhaseLoop:
    """One phase's training, in the shape of the Accelerate examples: build (optimizer,
    scheduler, loader, prepare), resume, then per batch `train_step` and, per optimizer
    step, `end_step` (clock, schedule, stop, evaluate, log, checkpoint). A step never
    reads the device; `sync` does, every `--sync_every` steps and where a log line, an
    evaluation or a checkpoint needs exact counts (docs/design.md, the hot path)."""

    def __init__(self, accelerator, phase: Phase, args: RunArgs, clock, metrics, valid):
        self.accelerator, self.phase, self.t = accelerator, phase, args.train
        self.args, self.clock, self.metrics, self.valid = args, clock, metrics, valid
        model = phase.model
        self.params = freeze_bottom(model, phase.frozen_layers)
        trainable = phase.trainable or TopModel(model, phase.frozen_layers)
        # Validation always runs the whole model: the trainable module itself when nothing
        # is frozen (it starts at token ids), else the same model seen from the embeddings.
        self.whole_model_loss = trainable if phase.frozen_layers == 0 else TopModel(model, 0)
        if self.t.compile:
            trainable.compile()  # in place: prepare, DDP and validation see one module
        self.progress = start_progress(accelerator, clock)
        optimizer, scheduler = self._optimizer()
        loader = make_block_loader(
            phase.blocks,
            rows_per_batch=self.t.batch_size,
            shuffle=True,
            seed=self.t.seed if phase.data_seed is None else phase.data_seed,
            num_workers=self.t.num_workers,
            pin_memory=accelerator.device.type == "cuda",
        )
        # The loader stays on the host: `stage_batch` counts a batch there, then moves it.
        self.trainable, self.optimizer, self.loader, self.scheduler = accelerator.prepare(
            trainable, optimizer, loader, scheduler, device_placement=[None, None, False, None]
        )
        model.to(accelerator.device)  # the frozen bottom lives outside the prepared module's DDP
        self.window, self.read, self.tally = Window(), Read(), Tally(accelerator.device)
        self.last_val, self.solo = None, accelerator.num_processes == 1
        self.sync_every = self.t.sync_every or self.t.log_every
        data = args.data
        self.per_row = (
            padded_gather_per_row(data.mask_prob, data.seq_len) if self.t.compile else None
        )
        budget = phase.share.budget if phase.share else None
        self.watches_time = self.t.max_wall_s is not None or bool(
            budget and (budget.wall_s or budget.cpu_s)
        )

    def _optimizer(self) -> tuple[torch.optim.Optimizer, LambdaLR]:
        phase, t = self.phase, self.t
        # Fused where the device has the kernel: it skips a non-finite step on the device
        # (`optimizer_step`). Its numbers differ from the for-loop AdamW's in the last bit
        # (7e-9 after 5 steps of tiny's top here); both sides of every comparison use it.
        optimizer = torch.optim.AdamW(
            decay_param_groups(phase.model, t.weight_decay, self.params),
            lr=phase.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_epsilon,
            fused=self.accelerator.device.type in FUSED_ADAMW_DEVICES,
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
            lambda _: lr_factor(
                phase.lr_span[0] + self.lr_progress * (phase.lr_span[1] - phase.lr_span[0]),
                phase.warmup_fraction,
                phase.lr_schedule,
                phase.decay_fraction,
            ),
        )
        return optimizer, scheduler

    def done_fraction(self) -> float:
        share = self.phase.share
        return share.progress(self.clock) if share else self.progress.step / self.phase.steps

    def estimated_progress(self) -> float:
        """Several processes between syncs: the clock holds the last values all ranks
        agreed on, so the schedule extrapolates from them at the phase's average rate so
        far, the same number on every rank (a step count is exact as it is)."""
        if self.phase.share is None:
            return self.done_fraction()
        (step0, progress0), (step, progress) = self.started, self.synced
        rate = (progress - progress0) / (step - step0) if step > step0 else 0.0
        return min(1.0, progress + rate * (self.progress.step - step))

    def out_of_budget(self) -> bool:
        """The run's wall-clock or the phase's share of a budget is used up."""
        wall = self.t.max_wall_s
        return (wall is not None and self.clock.wall_s >= wall) or (
            self.phase.share is not None and self.lr_progress >= 1.0
        )

    def resume(self) -> None:
        """Continue from the phase's checkpoint, if it has one."""
        phase = self.phase
        if usable_checkpoint(self.accelerator, phase.checkpoint_dir, phase.name):
            self.accelerator.load_state(str(phase.checkpoint_dir))  # restores self.progress
            self.accelerator.print(
                f"{phase.name}: resumed at step {self.progress.step}/{phase.steps}"
            )
        # Lines past where this phase starts (or resumes) are from an attempt that crashed:
        # they will be written again, so each step is logged at most once.
        self.metrics.truncate_after(phase.name, self.clock.step)
        self.lr_progress = self.done_fraction()  # where a resumed phase stands

    def stage_batch(self, batch: dict[str, torch.Tensor]) -> tuple[BatchCounts, dict[str, Any]]:
        """Count a batch on the host, then move it (from pinned memory on CUDA, without
        waiting for the copy)."""
        fill = self.phase.fill
        if fill is not None:
            batch = fill.plan(batch)
        counts, batch = host_batch(batch, self.per_row)
        if fill is not None:
            counts.frozen_layer_tokens = batch["fill"].layer_tokens
        device = self.accelerator.device
        return counts, send_to_device(batch, device, non_blocking=device.type == "cuda")

    def train_step(self, batch: dict[str, Any], counts: BatchCounts) -> None:
        """Forward, backward and (at an accumulation boundary) the optimizer step of one
        batch, without reading the device: the loss adds up in the tally, and a non-finite
        step is skipped on the device (`optimizer_step`)."""
        accelerator, phase = self.accelerator, self.phase
        if phase.before_step is not None:
            phase.before_step(self.progress.step)
        with accelerator.accumulate(self.trainable):
            inputs = _phase_inputs(phase.model, phase, batch, accelerator)
            loss, _ = self.trainable(
                batch["labels"],
                batch["attention_mask"],
                masked_positions=batch["masked_positions"],
                masked_labels=batch["masked_labels"],
                **inputs,
            )
            accelerator.backward(loss)
            self.tally.add(loss, counts.masked)
            if accelerator.sync_gradients:
                self.optimizer_step(self.tally.end_step(self.grad_norm()))
            self.optimizer.zero_grad()

    def grad_norm(self) -> torch.Tensor | None:
        """The gradients' total norm (clipped to --max_grad_norm when set), which decides
        with the loss whether a step is finite. After DDP's all-reduce every rank holds
        the same gradients, so every rank takes the same decision. None under fp16's loss
        scaler, which skips overflowing steps itself (inf norms while it calibrates are
        expected there)."""
        accelerator, max_norm = self.accelerator, self.t.max_grad_norm
        if max_norm > 0:
            norm = accelerator.clip_grad_norm_(self.params, max_norm)
        elif accelerator.scaler is None:
            norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.params if p.grad is not None]
            )
        return None if accelerator.scaler is not None else norm

    def optimizer_step(self, skip: torch.Tensor) -> None:
        """Apply the step unless `skip`: a non-finite step is never applied, so one bad batch
        does not poison the weights, and `nonfinite_patience` bad steps in a row stop the
        phase (at the next sync). The fused AdamW skips on the device, as it does for
        GradScaler (`found_inf`); fp16's scaler decides itself; another optimizer (a
        device without the fused kernel) reads `skip` here, a wait per step."""
        inner = self.optimizer.optimizer
        if self.accelerator.scaler is not None:
            self.optimizer.step()
        elif inner.defaults.get("fused"):
            inner.found_inf = skip.float()
            self.optimizer.step()
            del inner.found_inf
        elif not bool(skip):
            self.optimizer.step()

    def count(self, counts: BatchCounts) -> None:
        """Charge a batch: to the clock at once with one process (its counts are the run's),
        else to the window the next sync sums over ranks."""
        flops = 0.0
        if self.phase.flops_per_step is not None:
            flops = self.phase.flops_per_step(
                {
                    "tokens": counts.tokens,
                    "masked": counts.masked,
                    "frozen_layer_tokens": counts.frozen_layer_tokens,
                }
            )
        self.window.masked += counts.masked
        if self.solo:
            self.clock.tokens += counts.tokens
            self.clock.flops += flops
        else:
            self.window.tokens += counts.tokens
            self.window.flops += flops

    def end_step(self) -> bool:
        """After an optimizer step: advance the clock and schedule, decide (on every rank
        alike) whether to stop, evaluate, log and checkpoint. Returns True on the last step.
        One process checks its budget every step on host values; several agree at syncs."""
        self.progress.step += 1
        self.clock.step += 1
        self.bar.update(1)
        step = self.progress.step
        if self.solo:
            if self.watches_time:
                self.watch.tick()
            self.lr_progress = self.done_fraction()
            self.stopped = self.out_of_budget()
        else:
            self.lr_progress = self.estimated_progress()
        if self.stopped or step == self.phase.steps or self.is_sync_step(step):
            self.sync()
        last = step == self.phase.steps or self.stopped
        self.scheduler.step()  # the next step's rate
        self.evaluate_and_log(last)
        self.maybe_checkpoint()
        return last

    def is_sync_step(self, step: int) -> bool:
        """Every `--sync_every` steps, and wherever a log line, an evaluation or a checkpoint
        needs exact counts; with several processes also the phase's first step, where the
        schedule's rate estimate starts."""
        t = self.t
        return (
            step % self.sync_every == 0
            or step % t.log_every == 0
            or step % t.eval_every == 0
            or (self.phase.checkpoint_dir is not None and step % t.checkpoint_every == 0)
            or (not self.solo and step == self.started[0] + 1)
        )

    def sync(self) -> None:
        """Read the device's counters and stop a diverged phase; with several processes,
        also sum the counts over ranks, take the slowest rank's clock and agree to stop.
        The one place the loop waits for the device."""
        tally = self.tally
        if self.solo:
            loss, _, run, worst, bad_loss, bad_norm = tally.values.tolist()
            masked = self.window.masked
        else:
            loss, masked, run, worst, bad_loss, bad_norm = self.reconcile()
        self.read = Read(loss, int(masked), int(run))
        tally.worst.zero_()
        if worst >= self.t.nonfinite_patience:
            norm = None if self.accelerator.scaler is not None else bad_norm  # else measured
            raise _diverged(self.phase, self.progress.step, int(worst), bad_loss, norm, self.args)
        if not self.solo:
            self.lr_progress = self.done_fraction()
            self.synced = (self.progress.step, self.lr_progress)
            if self.out_of_budget():
                self.accelerator.set_trigger()
            self.stopped = self.accelerator.check_trigger()

    def reconcile(self) -> list[float]:
        """Sum the window's counts over ranks and take the slowest rank's clock (so every
        rank sees the same progress and learning rate, and stops at the same step, else
        the next all-reduce would hang); returns the window's loss sum and masked count and
        the non-finite run, worst run, last bad loss sum and norm."""
        acc, w, device, tally = self.accelerator, self.window, self.accelerator.device, self.tally
        if self.watches_time:
            self.watch.tick()
        host = [w.masked, w.tokens, w.flops, self.clock.wall_s, self.clock.cpu_s]
        host = torch.tensor(host, dtype=torch.float64, device=device)
        sums = acc.reduce(torch.cat([tally.values[:1], host[:3]]), reduction="sum")
        maxes = acc.reduce(torch.cat([tally.values[2:], host[3:]]), reduction="max")
        loss, masked, tokens, flops = sums.tolist()
        run, worst, bad_loss, bad_norm, wall, cpu = maxes.tolist()
        self.clock.tokens += int(tokens)
        self.clock.flops += flops
        w.tokens, w.flops = 0, 0.0
        if self.watches_time:
            self.clock.wall_s, self.clock.cpu_s = wall, cpu
        return [loss, masked, run, worst, bad_loss, bad_norm]

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
            if not self.watches_time:
                self.watch.tick()
            # else the clock stands where the stop decision read it (end_step, or the sync),
            # so a log line never shows a time past the budget on a step that went on; the
            # moments since are the next step's.
            record.update(
                step=self.clock.step,
                tokens=self.clock.tokens,
                wall_s=round(self.clock.wall_s, 3),
                cpu_s=round(self.clock.cpu_s, 3),
                flops=self.clock.flops,
                train_loss=self.read.loss_sum / max(self.read.masked, 1),
                lr=self.scheduler.get_last_lr()[0],
                stage=self.phase.name,
                **self.phase.extra,
            )
            self.metrics.log(record)
            self.bar.set_postfix(loss=f"{record['train_loss']:.3f}")
            self.tally.loss.zero_()  # a new window: log steps are sync steps, read just now
            self.window.masked = 0

    def maybe_checkpoint(self) -> None:
        phase, step = self.phase, self.progress.step
        if (
            phase.checkpoint_dir is not None
            and step % self.t.checkpoint_every == 0
            and step < phase.steps
            and self.read.run == 0  # checkpoint steps are sync steps: read just now
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
        self.started = self.synced = (p.step, self.lr_progress)  # for estimated_progress
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
            counts, batch = self.stage_batch(batch)
            self.train_step(batch, counts)
            self.count(counts)
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


def _phase_inputs(
    model: nn.Module, phase: Phase, batch: dict, accelerator: Accelerator
) -> dict[str, torch.Tensor]:
    if phase.frozen_layers == 0:
        return {"input_ids": batch["input_ids"]}
    if phase.cached or phase.fill is not None:
        if phase.fill is not None:
            with accelerator.autocast():  # the frozen bottom at the top's precision
                hidden = phase.fill.hidden(batch)
        else:
            hidden = batch["hidden"]
        # Under autocast the top's matmuls cast 16-bit inputs themselves and the residual
        # sum with the input promotes to float32: widening first would compute the same
        # numbers after one more pass over the batch. Without it, float32 weights need
        # float32 inputs.
        return {"hidden_states": hidden if accelerator.native_amp else hidden.float()}
    with torch.no_grad(), accelerator.autocast():  # the frozen bottom at the top's precision
        return {
            "hidden_states": bottom_forward(
                model, batch["input_ids"], batch["attention_mask"], phase.frozen_layers
            )
        }
