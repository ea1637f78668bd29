"""MSLT through the staged trainer, live (`cache: never`) or from the activation store
(`cache: always`). The stages split the comparison's budget evenly (stage k ends when
k/n of it is spent); with `mslt_joint_fraction`, a final joint phase (every layer trains,
live) takes that share of the budget and the stages split the rest."""

from __future__ import annotations

from dataclasses import replace

from transformers import AutoModelForMaskedLM, PreTrainedModel

from cached_mslt.methods.harness import MethodContext
from cached_mslt.metrics import RunClock
from cached_mslt.plan import StagePlan
from cached_mslt.run_layout import RunLayout
from cached_mslt.stages import run_stage


def _run(ctx: MethodContext, cache: str) -> PreTrainedModel:
    budget, joint = ctx.budget, ctx.method.mslt_joint_fraction
    n = len([int(v) for v in ctx.args.schedule.stage_layers.split(",") if v.strip()])
    # Shares end the phases. A stage's token count then only informs `--cache auto`, which
    # mslt-live and mslt-cached do not use (they fix the mode): the even split of a token
    # budget, or a placeholder under other budgets.
    stage_tokens = str(budget.tokens * (1 - joint) / n if budget.tokens else 1)
    schedule = replace(
        ctx.args.schedule,
        cache=cache,
        stage_steps=None,
        stage_tokens=stage_tokens,
        joint_tokens=(budget.tokens or 1.0) * joint,  # > 0 adds the joint phase to the plan
    )
    args = replace(ctx.args, schedule=schedule)
    done = None
    for stage in StagePlan.from_args(args).stages:
        end = 1.0 if stage.joint else (1 - joint) * stage.index / n
        manifest = run_stage(
            args, stage.index, ctx.accelerator, extra={"method": ctx.name}, share=ctx.share(end)
        )
        ctx.clock = RunClock(**manifest["clock"])
        ctx.phases.append(
            {
                "phase": stage.name,
                "mode": manifest["mode"],
                "cache_decision": manifest["cache_decision"],
                **manifest["train"],
                **manifest["timings"],
            }
        )
        done = stage.index
        if ctx.out_of_budget:
            break
    layout = RunLayout.of(args)
    assert layout.read_manifest(done) is not None
    return AutoModelForMaskedLM.from_pretrained(layout.model_dir(done))


def run_live(ctx: MethodContext) -> PreTrainedModel:
    return _run(ctx, "never")


def run_cached(ctx: MethodContext) -> PreTrainedModel:
    return _run(ctx, "always")
