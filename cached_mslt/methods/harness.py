"""One harness for every method: same data, model family, optimizer settings, budget and
metrics. A method is a `run(ctx)` function (`MethodRun`, listed in `cached_mslt.methods.METHODS`) that changes the model between phases and says
what trains in each; `ctx.train` is the shared loop (cached_mslt.training.trainer.train_phase).
"""

from __future__ import annotations

import importlib
import json
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from cached_mslt.config import MethodArgs, RunArgs
from cached_mslt.data import PreparedBlocks, PreparedData, load_prepared
from cached_mslt.methods.registry import METHODS
from cached_mslt.models import TopModel, build_model
from cached_mslt.rundir import RunLayout
from cached_mslt.stages import (
    UNBOUNDED_STEPS,
    make_accelerator,
    run_block_rows,
    train_rows,
)
from cached_mslt.training import (
    MIN_TRAINED_SHARE,
    Budget,
    MetricsWriter,
    Phase,
    PhaseShare,
    RunClock,
    clock_fields,
    step_flops,
    train_phase,
    validation_loss,
)

DEFAULT_BUDGET_TOKENS = 2_097_152
# A finished run's status: every phase trained on its share ("ok"), or some phase trained
# no step or too little of its share ("short", `phase_shortfall` says which and why).
FINISHED = ("ok", "short")


@dataclass
class MethodContext:
    """What a method's schedule needs: the run's settings, data, clock and the shared loop."""

    name: str
    args: RunArgs
    method: MethodArgs
    accelerator: Accelerator
    data: PreparedData
    run_dir: Path
    clock: RunClock = field(default_factory=RunClock)
    phases: list[dict[str, Any]] = field(default_factory=list)
    last_optimizer: torch.optim.Optimizer | None = None
    # The last phase's model and the module that computes its whole-model loss (PLD's own).
    last_trained: tuple[nn.Module, nn.Module] | None = None

    @property
    def budget(self) -> Budget:
        return method_budget(self.method)

    @property
    def out_of_budget(self) -> bool:
        wall = self.args.train.max_wall_s
        return self.budget.spent(self.clock) >= 1.0 or (
            wall is not None and self.clock.wall_s >= wall
        )

    def share(self, end: float) -> PhaseShare:
        """The next phase's part of the budget: from what is spent now to `end` (<= 1)."""
        return PhaseShare(self.budget, self.budget.spent(self.clock), min(1.0, end))

    def new_model(self, num_layers: int) -> nn.Module:
        return build_model(
            self.args.model, self.data.manifest["vocab_size"], num_layers, seed=self.args.train.seed
        )

    def train(
        self,
        phase_name: str,
        model: nn.Module,
        share: float,
        *,
        lr_multiplier: float = 1.0,
        before_step: Callable[[int], None] | None = None,
        trainable: nn.Module | None = None,
        trained_layers: Callable[[], int] | None = None,
        init_optimizer: Callable[[torch.optim.Optimizer], None] | None = None,
    ) -> dict[str, Any]:
        """Train every parameter of `model` on `share` more of the budget (capped by what
        is left), with its own warmup and decay, counting FLOPs of the layers that ran."""
        phase_share, start = self.share(self.budget.spent(self.clock) + share), replace(self.clock)
        if self.out_of_budget:
            self.record_phase(phase_name, phase_share, start, start, {"steps": 0, "skipped": True})
            return {"skipped": True}
        config, seq_len = model.config, self.args.data.seq_len
        layers = trained_layers or (lambda: config.num_hidden_layers)
        rows = train_rows(self.args, len(self.data.train))
        phase = Phase(
            name=phase_name,
            model=model,
            frozen_layers=0,
            steps=UNBOUNDED_STEPS,
            share=phase_share,
            blocks=PreparedBlocks(
                self.data.train,
                run_block_rows(self.args),
                rows,
            ),
            cached=False,
            learning_rate=self.args.train.learning_rate * lr_multiplier,
            warmup_fraction=self.args.schedule.warmup_fraction,
            lr_schedule=self.args.schedule.lr_schedule,
            decay_fraction=self.args.schedule.decay_fraction,
            before_step=before_step,
            trainable=trainable,
            init_optimizer=init_optimizer,
            flops_per_step=lambda c: step_flops(
                config,
                tokens=c["tokens"],
                masked_tokens=c["masked"],
                trained_layers=layers(),
                frozen_live_layers=0,
                seq_len=seq_len,
            ),
            extra={"method": self.name},
        )
        metrics = MetricsWriter(self.run_dir, self.accelerator)
        stats = train_phase(
            self.accelerator, phase, self.args, self.clock, metrics, self.data.valid
        )
        self.record_phase(
            phase_name, phase_share, start, start, stats, layers=config.num_hidden_layers
        )
        self.last_optimizer = phase.optimizer
        self.last_trained = (model, trainable or TopModel(model, 0))
        return stats

    def record_phase(
        self,
        name: str,
        share: PhaseShare,
        start: RunClock,
        train_start: RunClock,
        stats: dict[str, Any],
        **fields: Any,
    ) -> dict[str, Any]:
        """Keep what a phase did against its share (`trained_share`, read by
        `phase_shortfall`) and put its end on metrics.jsonl's clock, so the last line is
        the method's whole charge even when the phase trained no step. `train_start`:
        where its training began (after a store build, if it built one)."""
        record = {
            "phase": name,
            **fields,
            **stats,
            "share": [share.start, share.end],
            "trained_share": trained_share(share, train_start, self.clock),
        }
        self.phases.append(record)
        line = {
            **clock_fields(self.clock),
            "event": "phase_end",
            "stage": name,
            "method": self.name,
        }
        MetricsWriter(self.run_dir, self.accelerator).log(line)
        return record


def trained_share(share: PhaseShare, train_start: RunClock, end: RunClock) -> float:
    """The part of its share a phase spent training (from `train_start` to `end`)."""
    width = share.end - share.start
    if width <= 0:
        return 0.0
    return (share.budget.spent(end) - share.budget.spent(train_start)) / width


def phase_shortfall(phase: dict[str, Any]) -> str | None:
    """Why a phase does not count as run (None if it does): it never began, trained no
    step, or trained on less than MIN_TRAINED_SHARE of its share; what took the share
    (a store build, the phases before it) is named."""
    if phase.get("skipped"):
        return "never ran: the budget was spent before it began"
    built, (start, end) = phase.get("build_share"), phase["share"]
    cause = f": its store build took {built:.0%} of its share" if built else ""
    if end <= start:
        cause = ": the phases before it had spent its share"
    if phase.get("steps", 0) == 0:
        return f"trained 0 steps{cause}"
    if phase["trained_share"] < MIN_TRAINED_SHARE:
        return f"trained on {phase['trained_share']:.0%} of its share{cause}"
    return None


def run_status(phases: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """A finished run's status ("ok" or "short": some phase fell short) and one note per
    phase that fell short or ran live because its store build would not fit its share."""
    short = [f"{p['phase']} {why}" for p in phases if (why := phase_shortfall(p))]
    live = [
        f"{p['phase']} ran live: {p['live_under_budget']['reason']}"
        for p in phases
        if p.get("live_under_budget")
    ]
    return ("short" if short else "ok"), short + live


def final_validation(ctx: MethodContext, model: nn.Module) -> float:
    """The final model's validation loss, measured after the last phase (a phase's last
    evaluation is of its own model: an MSLT stage that trained nothing never evaluated
    the grown model it saved), and logged on the run's final clock."""
    trained = ctx.last_trained
    module = trained[1] if trained and trained[0] is model else TopModel(model, 0)
    model.to(ctx.accelerator.device)
    t = ctx.args.train
    loss = validation_loss(module, ctx.accelerator, ctx.data.valid, t.batch_size, t.eval_batches)
    line = {**clock_fields(ctx.clock), "event": "final", "val_loss": loss, "stage": "final"}
    MetricsWriter(ctx.run_dir, ctx.accelerator).log({**line, "method": ctx.name})
    return loss


# A method: builds its model(s), trains them through `MethodContext.train`, returns the final model.
MethodRun = Callable[[MethodContext], nn.Module]


def method_budget(method: MethodArgs) -> Budget:
    """The budget every method of a comparison gets (tokens by default)."""
    given = dict(
        tokens=method.budget_tokens,
        wall_s=method.budget_wall_s,
        cpu_s=method.budget_cpu_s,
        flops=method.budget_flops,
    )
    if all(v is None for v in given.values()):
        return Budget(tokens=DEFAULT_BUDGET_TOKENS)
    return Budget(**given)


def method_runner(name: str) -> MethodRun:
    """The `run(ctx)` function of method `name`."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    module, function = METHODS[name]
    return getattr(importlib.import_module(f"cached_mslt.methods.{module}"), function)


# Method options that say how a comparison is run, not what a method trains.
_NOT_SETTINGS = ("methods", "compare_dir", "finetune", "reuse")


def run_settings(args: RunArgs, method: MethodArgs, data_fingerprint: str) -> dict[str, Any]:
    """What determines a method's run (everything but where it is written, plus what the
    prepared data holds), kept in result.json so a finished run is reused only for the
    same settings."""
    settings = json.loads(json.dumps(args.to_dict(), default=str))
    settings["train"].pop("run_dir")
    settings["data"]["fingerprint"] = data_fingerprint
    method_dict = {k: v for k, v in asdict(method).items() if k not in _NOT_SETTINGS}
    return {**settings, "method": method_dict}


def run_method(name: str, args: RunArgs, method: MethodArgs, run_dir: Path) -> dict[str, Any]:
    """Run one method into `run_dir` (metrics.jsonl, final/ checkpoint, result.json).
    A failure is recorded in result.json and returned, not raised: a comparison goes on."""
    run = method_runner(name)
    run_dir = Path(run_dir)
    args = replace(args, train=replace(args.train, run_dir=str(run_dir)))
    accelerator = make_accelerator(args, find_unused_parameters=name == "pld")
    # A comparison run starts clean (resuming would mix budgets). One rank clears it: two
    # racing would fail each other's mkdir or delete what the other just made.
    if accelerator.is_main_process:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()
    set_seed(args.train.seed)
    data = load_prepared(args.data.prepared_dir, args.data)
    ctx = MethodContext(name, args, method, accelerator, data, run_dir)
    started = time.time()
    settings = run_settings(args, method, data.manifest["fingerprint"])
    result: dict[str, Any] = {"method": name, "settings": settings}
    layout = RunLayout(run_dir)
    try:
        model = run(ctx)
        final_loss = final_validation(ctx, model)
        final = layout.final_model
        if accelerator.is_main_process:
            model.save_pretrained(final)
            data.tokenizer().save_pretrained(final)
        status, notes = run_status(ctx.phases)
        result.update(
            status=status, status_notes=notes, final_val_loss=final_loss, final_model=str(final)
        )
    except Exception as e:  # reported in the comparison table; the other methods still run
        result.update(
            status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()
        )
        accelerator.print(f"{name} failed: {e}")
    accelerator.wait_for_everyone()
    result.update(clock=ctx.clock.to_dict(), phases=ctx.phases, elapsed_s=time.time() - started)
    if accelerator.is_main_process:
        layout.result.write_text(json.dumps(result, indent=2, default=str))
    accelerator.free_memory()
    return result
