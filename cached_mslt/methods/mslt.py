"""MSLT through the staged trainer: the stage plan with the budget split evenly over the
stages, live (`cache: never`) or from the activation store (`cache: always`)."""

from __future__ import annotations

from dataclasses import replace

from transformers import BertForMaskedLM

from cached_mslt.metrics import RunClock
from cached_mslt.plan import StagePlan
from cached_mslt.stages import read_manifest, run_stage, stage_dir


def _run(ctx, cache: str) -> BertForMaskedLM:
    plan_args = replace(
        ctx.args, schedule=replace(ctx.args.schedule, cache=cache, stage_steps=None)
    )
    stages = StagePlan.from_args(plan_args).stages
    per_stage = ctx.budget_tokens / len(stages)
    args = replace(plan_args, schedule=replace(plan_args.schedule, stage_tokens=str(per_stage)))
    done = None
    for stage in StagePlan.from_args(args).stages:
        manifest = run_stage(args, stage.index, ctx.accelerator, extra={"method": ctx.name})
        ctx.clock = RunClock(**manifest["clock"])
        ctx.phases.append(
            {
                "phase": stage.name,
                "mode": manifest["mode"],
                **manifest["train"],
                **manifest["timings"],
            }
        )
        done = stage.index
        if ctx.out_of_budget:
            break
    assert read_manifest(args, done) is not None
    return BertForMaskedLM.from_pretrained(stage_dir(args, done) / "model")


def run_live(ctx) -> BertForMaskedLM:
    return _run(ctx, "never")


def run_cached(ctx) -> BertForMaskedLM:
    return _run(ctx, "always")
