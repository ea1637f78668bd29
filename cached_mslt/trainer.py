"""The one training loop. Every stage and every method runs through `train_phase`.

A phase is a stretch of training with a fixed set of trainable parameters: an MSLT stage,
the full-model baseline, a level of a V-cycle. Hidden states come from the activation
store (cached), from the frozen bottom run live under no_grad (`cache: never`), or the
trainable part starts at the token ids (nothing frozen); the step after that is the same.
"""

from __future__ import annotations

import json
import math
import shutil
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

TRAINER_STATE = "trainer_state.json"


class DivergenceError(RuntimeError):
    """Training produced non-finite losses or gradients for too many steps in a row."""


@dataclass
class Phase:
    name: str  # "stage-2", "full", ...: the `stage` field of every metrics line
    model: nn.Module  # the whole model; the phase decides what of it trains
    frozen_layers: int  # 0: everything trains, from token ids
    steps: int  # optimizer steps (with `share`: an upper bound)
    blocks: Any  # map-style dataset of row blocks: store BlockDataset or PreparedBlocks
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
def evaluate(
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


def _save_checkpoint(accelerator: Accelerator, directory: Path, state: dict) -> None:
    """save_state into a temporary dir, then swap it in: a crash mid-save leaves the
    previous checkpoint intact."""
    tmp = directory.with_name(directory.name + ".tmp")
    with saving(tmp, "checkpoint"):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank has written its RNG state before the swap
    if accelerator.is_main_process:
        with saving(tmp, "checkpoint"):
            (tmp / TRAINER_STATE).write_text(json.dumps(state))
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    accelerator.wait_for_everyone()


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
    t = args.train
    if accelerator.device.type == "cpu":
        # AdamW's second moments start denormal; x86 CPUs run those ops ~2x slower (measured
        # on the tiny step), which would penalise methods by their trainable parameter count.
        torch.set_flush_denormal(True)
    model = phase.model
    params = freeze_bottom(model, phase.frozen_layers)
    trainable = phase.trainable or TopModel(model, phase.frozen_layers)
    # Validation always runs the whole model: the trainable module itself when nothing is
    # frozen (it starts at token ids), else the same model seen from the embeddings.
    whole_model_loss = trainable if phase.frozen_layers == 0 else TopModel(model, 0)
    optimizer = torch.optim.AdamW(
        decay_param_groups(model, t.weight_decay, params),
        lr=phase.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
    )
    if phase.init_optimizer is not None:
        phase.init_optimizer(optimizer)
    phase.optimizer = optimizer
    # The learning rate follows the phase's progress: steps done over steps planned, or the
    # share of its budget spent. One rule for both, and it ignores LambdaLR's step count,
    # which Accelerate advances once per process each step.
    done = {"progress": phase.share.progress(clock) if phase.share else 0.0}
    scheduler = LambdaLR(
        optimizer,
        lambda _: lr_factor(done["progress"], phase.warmup_fraction, phase.lr_schedule),
    )
    rows_per_batch = t.batch_size
    loader = make_block_loader(
        phase.blocks,
        rows_per_batch=rows_per_batch,
        shuffle=True,
        seed=t.seed,
        num_workers=t.num_workers,
    )
    trainable, optimizer, loader, scheduler = accelerator.prepare(
        trainable, optimizer, loader, scheduler
    )
    model.to(accelerator.device)  # the frozen bottom lives outside the prepared module's DDP

    step, epoch, batches_in_epoch = 0, 0, 0
    start = clock.to_dict()
    if phase.checkpoint_dir is not None and (phase.checkpoint_dir / TRAINER_STATE).exists():
        accelerator.load_state(str(phase.checkpoint_dir))
        saved = json.loads((phase.checkpoint_dir / TRAINER_STATE).read_text())
        step, epoch, batches_in_epoch = saved["step"], saved["epoch"], saved["batches_in_epoch"]
        start = saved["clock_at_start"]
        for k, v in saved["clock"].items():
            setattr(clock, k, v)
        accelerator.print(f"{phase.name}: resumed at step {step}/{phase.steps}")
    # Lines past where this phase starts (or resumes) are from an attempt that crashed: they
    # will be written again, so each step is logged at most once.
    metrics.truncate_after(phase.name, clock.step)

    watch = Stopwatch(clock)

    def progress() -> float:
        return phase.share.progress(clock) if phase.share else step / phase.steps

    done["progress"] = progress()  # where a resumed phase stands
    set_modes(model, phase.frozen_layers)
    bar = tqdm(
        total=None if phase.share else phase.steps,
        initial=step,
        desc=phase.name,
        unit="step",
        disable=not accelerator.is_local_main_process,
    )
    running_loss, running_n = 0.0, 0
    last_val = None
    window_finite, nonfinite_run = True, 0
    budget = phase.share.budget if phase.share else None
    watches_time = t.max_wall_s is not None or (budget and (budget.wall_s or budget.cpu_s))
    stopping = (t.max_wall_s is not None and clock.wall_s >= t.max_wall_s) or (
        phase.share is not None and done["progress"] >= 1.0
    )
    while step < phase.steps and not stopping:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        epoch_loader = (
            accelerator.skip_first_batches(loader, batches_in_epoch) if batches_in_epoch else loader
        )
        for batch in epoch_loader:
            batches_in_epoch += 1
            if phase.before_step is not None:
                phase.before_step(step)
            with accelerator.accumulate(trainable):
                inputs = _phase_inputs(model, phase, batch)
                loss, n_masked = trainable(batch["labels"], batch["attention_mask"], **inputs)
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
                window_finite = window_finite and math.isfinite(float(counts[2]))
                grad_norm = None
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    grad_norm = float(accelerator.clip_grad_norm_(params, t.max_grad_norm))
                    # Under fp16 the loss scaler skips overflowing steps itself and inf norms
                    # while it calibrates are expected: only the loss counts there.
                    if accelerator.scaler is None:
                        window_finite = window_finite and math.isfinite(grad_norm)
                # A non-finite step is skipped, never applied: one bad batch does not poison
                # the weights, and `nonfinite_patience` bad steps in a row stop the stage.
                if window_finite or not accelerator.sync_gradients:
                    optimizer.step()
                optimizer.zero_grad()
            clock.tokens += int(counts[0])
            running_loss += float(counts[2])
            running_n += int(counts[1])
            if phase.flops_per_step is not None:
                clock.flops += phase.flops_per_step(
                    {"tokens": int(counts[0]), "masked": int(counts[1])}
                )
            if not accelerator.sync_gradients:
                continue
            step += 1
            clock.step += 1
            bar.update(1)
            nonfinite_run = 0 if window_finite else nonfinite_run + 1
            window_finite = True
            if nonfinite_run >= t.nonfinite_patience:
                raise _diverged(phase, step, nonfinite_run, float(counts[2]), grad_norm, args)
            if watches_time:
                # Every rank takes the slowest rank's clock, so all see the same progress and
                # stop at the same step (else the next all-reduce would hang).
                watch.tick()
                times = torch.tensor(
                    [clock.wall_s, clock.cpu_s], dtype=torch.float64, device=accelerator.device
                )
                clock.wall_s, clock.cpu_s = accelerator.reduce(times, reduction="max").tolist()
            done["progress"] = progress()
            scheduler.step()  # the next step's rate
            stopping = (t.max_wall_s is not None and clock.wall_s >= t.max_wall_s) or (
                phase.share is not None and done["progress"] >= 1.0
            )
            last = step == phase.steps or stopping
            record: dict[str, Any] = {}
            if step % t.eval_every == 0 or last:
                with watch.paused():  # evaluation is not training time, for any method
                    last_val = evaluate(
                        whole_model_loss, accelerator, valid, t.batch_size, t.eval_batches
                    )
                set_modes(model, phase.frozen_layers)
                record["val_loss"] = last_val
            if step % t.log_every == 0 or record or last:
                watch.tick()
                record.update(
                    step=clock.step,
                    tokens=clock.tokens,
                    wall_s=round(clock.wall_s, 3),
                    cpu_s=round(clock.cpu_s, 3),
                    flops=clock.flops,
                    train_loss=running_loss / max(running_n, 1),
                    lr=scheduler.get_last_lr()[0],
                    stage=phase.name,
                    **phase.extra,
                )
                metrics.log(record)
                bar.set_postfix(loss=f"{record['train_loss']:.3f}")
                running_loss, running_n = 0.0, 0
            if (
                phase.checkpoint_dir is not None
                and step % t.checkpoint_every == 0
                and step < phase.steps
                and nonfinite_run == 0
                and _all_finite(params)  # never checkpoint weights a resume cannot use
            ):
                watch.tick()
                _save_checkpoint(
                    accelerator,
                    phase.checkpoint_dir,
                    {
                        "step": step,
                        "epoch": epoch,
                        "batches_in_epoch": batches_in_epoch,
                        "clock": clock.to_dict(),
                        "clock_at_start": start,
                    },
                )
            if last:
                break
        else:
            epoch += 1
            batches_in_epoch = 0
    bar.close()
    watch.tick()
    accelerator.wait_for_everyone()
    stats = {
        "steps": step,
        "stopped_by_wall_budget": stopping,
        "epochs": epoch + batches_in_epoch / max(len(loader), 1),
        "train_s": clock.wall_s - start["wall_s"],
        "tokens": clock.tokens - start["tokens"],
        "val_loss": last_val,
    }
    stats["tokens_per_s"] = stats["tokens"] / stats["train_s"] if stats["train_s"] > 0 else None
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
