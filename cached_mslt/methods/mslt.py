"""MSLT through the staged trainer, live (`cache: never`) or from the activation store
filled by the training steps (`cache: write-through`, docs/design.md invariant 9) or built
eagerly per stage (`--mslt_cache always`, what `mslt-cached` did before write-through). The stages split the comparison's budget in the proportions of the
plan's `stage_tokens` (the `tiny` preset's 5M, 2M, 2M, 2M gives stage 1 5/11 of it; equal
stage tokens split it evenly), so a comparison runs the plan `pretrain.py` runs, scaled
to the budget. The `-joint` variants end with a joint phase (every layer trains, live) on
`mslt_joint_fraction` of the budget; the stages split the rest."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from itertools import accumulate
from pathlib import Path
from typing import Any

from transformers import AutoModelForMaskedLM, PreTrainedModel

from cached_mslt.config import ConfigError, RunArgs
from cached_mslt.methods.harness import MethodContext
from cached_mslt.rundir import RunLayout
from cached_mslt.stages import StagePlan, run_stage
from cached_mslt.training import PhaseShare, RunClock


def _run(ctx: MethodContext, cache: str, with_joint: bool = False) -> PreTrainedModel:
    joint = ctx.method.mslt_joint_fraction if with_joint else 0.0
    weights = stage_weights(ctx.args)
    args = _staged_args(ctx, cache, joint, weights)
    done, ends = None, list(accumulate(w / sum(weights) for w in weights))
    stages = StagePlan.from_args(args).stages
    source = ctx.method.mslt_first_stage_from
    # The source run itself trains its stage 1: both methods of a pair take one option.
    if source and Path(source).resolve() != ctx.run_dir.resolve():
        adopt_first_stage(ctx, args, Path(source), ends[0] * (1 - joint))
    for stage in stages:
        end = 1.0 if stage.joint else (1 - joint) * ends[stage.index - 1]
        share, start = ctx.share(end), replace(ctx.clock)
        manifest = run_stage(
            args, stage.index, ctx.accelerator, extra={"method": ctx.name}, share=share
        )
        ctx.clock = RunClock(**manifest["clock"])
        record_stage(ctx, share, start, manifest)
        done = stage.index
        if ctx.out_of_budget:
            break
        if stage.index == 1 and not ctx.budget.tokens:
            estimates = estimated_stage_tokens(args, weights, manifest["train"]["tokens"])
            args = replace(args, schedule=replace(args.schedule, stage_tokens=estimates))
    for stage in stages[done:]:  # the budget ran out before them: the status says so
        ctx.record_phase(
            stage.name, ctx.share(1.0), ctx.clock, ctx.clock, {"steps": 0, "skipped": True}
        )
    layout = RunLayout.of(args)
    assert layout.read_manifest(done) is not None
    return AutoModelForMaskedLM.from_pretrained(layout.model_dir(done))


# Options that only say how a stage with frozen layers caches: stage 1 has none, so a
# stage 1 trained under other values of these is the stage 1 this run would train.
def _stage_one_options(args: dict[str, Any]) -> dict[str, Any]:
    schedule = {
        k: v
        for k, v in args["schedule"].items()
        if not k.startswith("cache") and k != "overwrite_cache"
    }
    train = {k: v for k, v in args["train"].items() if k != "run_dir"}
    return {**args, "schedule": schedule, "train": train}


def adopt_first_stage(ctx: MethodContext, args: RunArgs, source: Path, end: float) -> None:
    """Start this MSLT method from `source`'s finished stage 1 (`--mslt_first_stage_from`):
    its model and manifest are copied into this run, so `run_stage` finds stage 1 done, and
    its metrics lines join this run's, so the report's curves and clock include it. Refused
    unless `source` ran the same options (cache options aside) under the same budget."""
    theirs = RunLayout(source)
    manifest, config = theirs.read_manifest(1), theirs.read_config()
    if manifest is None or config is None:
        raise ConfigError(
            f"--mslt_first_stage_from {source}: no finished stage 1 there (expected "
            f"{theirs.manifest(1)}); run that method first, e.g. --methods mslt-live with the "
            "same --compare_dir, and start this one once its stage 1 is done"
        )
    ours = _stage_one_options(json.loads(json.dumps(args.to_dict(), default=str)))
    differ = {
        f"{group}.{key}": (value, ours[group].get(key))
        for group, options in _stage_one_options(config).items()
        for key, value in options.items()
        if ours[group].get(key) != value
    }
    if differ:
        raise ConfigError(
            f"--mslt_first_stage_from {source}: its stage 1 ran other options "
            f"(theirs, ours): {differ}; start both methods with the same options"
        )
    clock = RunClock(**manifest["clock"])
    spent = ctx.budget.spent(clock)
    step = spent / max(clock.step, 1)  # a stage ends on the step that reaches its share
    if not end - 1e-9 <= spent < end + 2 * step:
        raise ConfigError(
            f"--mslt_first_stage_from {source}: its stage 1 ended at {spent:.1%} of this "
            f"run's budget, where this run's stage 1 ends at {end:.1%}; give both methods "
            "the same budget"
        )
    if ctx.accelerator.is_main_process:
        layout = RunLayout.of(args)
        shutil.copytree(theirs.model_dir(1), layout.model_dir(1))
        shutil.copy(theirs.manifest(1), layout.manifest(1))
        stage_one = manifest["stage"]["name"]
        with open(theirs.metrics) as lines, open(layout.metrics, "a") as out:
            for line in map(json.loads, lines):
                if line.get("stage") == stage_one and line.get("event") != "phase_end":
                    out.write(json.dumps({**line, "method": ctx.name}) + "\n")
    ctx.accelerator.wait_for_everyone()


def _staged_args(ctx: MethodContext, cache: str, joint: float, weights: list[float]) -> RunArgs:
    """The run's options with the stage plan scaled to the budget, in `cache` mode."""
    budget = ctx.budget
    # Shares end the phases. A stage's token count then only informs `--cache auto`'s
    # decision, which mslt-live and mslt-cached record but do not follow (they fix the
    # mode): its part of a token budget; under other budgets, the plan's proportions until
    # stage 1 has shown what the budget buys (`estimated_stage_tokens`).
    total = budget.tokens * (1 - joint) if budget.tokens else sum(weights)
    schedule = replace(
        ctx.args.schedule,
        cache=cache,
        stage_steps=None,
        stage_tokens=",".join(f"{total * w / sum(weights):.0f}" for w in weights),
        joint_tokens=(budget.tokens or 1.0) * joint,  # > 0 adds the joint phase to the plan
    )
    return replace(ctx.args, schedule=schedule)


def record_stage(
    ctx: MethodContext, share: PhaseShare, start: RunClock, manifest: dict[str, Any]
) -> dict[str, Any]:
    """A stage among the method's phases: its mode and why, its training, the part of its
    share its store build took, and whether it ran live because a build would not have
    fit (`cached_mslt.stages.runner.fit_build_to_share`). Its training began where its
    manifest's `cache.clock_after` says (the stage's start when that is missing)."""
    cache = manifest["cache"]
    train_start = RunClock(**cache.get("clock_after", start.to_dict()))
    fields: dict[str, Any] = {
        "mode": manifest["mode"],
        "cache_decision": manifest["cache_decision"],
        **manifest["timings"],
    }
    built = manifest["mode"] == "cached" and not cache.get("reused")
    if built and share.end > share.start:
        spent = share.budget.spent
        fields["build_share"] = (spent(train_start) - spent(start)) / (share.end - share.start)
    if cache.get("live_under_budget"):
        fields["live_under_budget"] = cache["live_under_budget"]
    name = manifest["stage"]["name"]
    return ctx.record_phase(name, share, start, train_start, manifest["train"], **fields)


def _growth_stages(args: RunArgs) -> list:
    """The plan's growing stages (the joint phase, if any, left out)."""
    return [s for s in StagePlan.from_args(args).stages if not s.joint]


def stage_weights(args: RunArgs) -> list[float]:
    """Each stage's part of the staged budget, in proportion to the plan's stage tokens
    (equal parts when the plan counts steps instead)."""
    stages = _growth_stages(args)
    if any(s.tokens is None for s in stages):
        return [1.0] * len(stages)
    return [float(s.tokens) for s in stages]


def estimated_stage_tokens(args: RunArgs, weights: list[float], stage_one_tokens: int) -> str:
    """What each stage will read under a time or FLOP budget, run live: stage 1's tokens
    scaled by the stage's share and by its live cost per token relative to stage 1's
    (frozen layers count one forward, trained ones three: docs/design.md cost model)."""
    stages = _growth_stages(args)

    def live_cost(stage) -> int:
        return stage.frozen_layers + 3 * (stage.num_layers - stage.frozen_layers)

    first = live_cost(stages[0])
    return ",".join(
        f"{max(1.0, stage_one_tokens * w / weights[0] * first / live_cost(s)):.0f}"
        for s, w in zip(stages, weights)
    )


def run_live(ctx: MethodContext) -> PreTrainedModel:
    return _run(ctx, "never")


def run_cached(ctx: MethodContext) -> PreTrainedModel:
    return _run(ctx, ctx.method.mslt_cache)


def run_live_joint(ctx: MethodContext) -> PreTrainedModel:
    return _run(ctx, "never", with_joint=True)


def run_cached_joint(ctx: MethodContext) -> PreTrainedModel:
    return _run(ctx, ctx.method.mslt_cache, with_joint=True)
