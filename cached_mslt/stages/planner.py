"""What a run will cost before it runs: `pipelines/plan.py` (docs/scaling.md, "Planning a run").

The run's own options give the model, stage plan, views, batch and store dtype; `PlanArgs`
gives the corpus and the cluster. Every stage is priced in each cache mode by
`cost_model.stage_seconds`, and `--cache auto`'s choice is the one `cache_choice` makes
with those rates; the totals compare live MSLT, cached MSLT (the choices) and the full
model trained on the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cached_mslt.config import PRESETS, ConfigError, PlanArgs, RunArgs
from cached_mslt.stages.cache_choice import choose_cache
from cached_mslt.stages.cost_model import (
    MODES,
    ModelShape,
    Rates,
    Stored,
    stage_seconds,
    stored_after,
)
from cached_mslt.stages.plan import Stage, StagePlan
from cached_mslt.training import gpu_peak
from storage import StoreSpec


def model_shape(args: RunArgs) -> ModelShape:
    """The shape a run of `args` trains and stores."""
    itemsize = StoreSpec(num_rows=1, seq_len=8, hidden_size=8, dtype=args.schedule.cache_dtype)
    return ModelShape(
        hidden_size=args.model.hidden_size,
        intermediate_size=args.model.intermediate_size,
        vocab_size=args.data.vocab_size or PRESETS[args.model.preset]["vocab_size"],
        seq_len=args.data.seq_len,
        mask_prob=args.data.mask_prob,
        store_itemsize=itemsize.row_bytes / (8 * 8),
    )


def plan_rates(plan: PlanArgs, peak_tflops: float | None = None) -> Rates:
    """Per-process rates: measured TFLOP/s if given, else a peak (`peak_tflops`, the run's
    --peak_tflops, or the GPU table) times the MFU; the store's bandwidth split evenly
    over processes."""
    peak = peak_tflops
    if peak is None and plan.gpu is not None:
        found = gpu_peak(plan.gpu, half=True)
        if found is None:
            raise ConfigError(
                f"--gpu {plan.gpu!r} is not in the peak table (cached_mslt/training/flops.py); "
                f"pass --peak_tflops with its dense bf16 TFLOP/s"
            )
        peak = found.flops_per_s / 1e12
    train, forward = plan.train_tflops, plan.forward_tflops
    if train is None or forward is None:
        if peak is None:
            raise ConfigError(
                "no compute rate: pass --gpu (e.g. A100), --peak_tflops, or measured "
                "--train_tflops and --forward_tflops"
            )
        train = train or peak * plan.mfu
        forward = forward or peak * (plan.forward_mfu or plan.mfu)
    return Rates(
        train_flops_per_s=train * 1e12,
        forward_flops_per_s=forward * 1e12,
        read_bytes_per_s=plan.read_gbps * 1e9 / plan.gpus,
        write_bytes_per_s=plan.write_gbps * 1e9 / plan.gpus,
        overlap=plan.io_overlap,
        processes=plan.gpus,
        stage_overhead_s=plan.stage_overhead_s,
    )


@dataclass(frozen=True)
class PlannedStage:
    stage: Stage
    rows_read: float
    epochs: float
    choice: str
    why: str
    costs: dict  # mode -> StageCost

    @property
    def chosen(self):
        return self.costs[self.choice]


def stage_rows_read(stage: Stage, args: RunArgs, processes: int) -> float:
    """Rows a stage reads over all processes: its tokens, or steps x global batch."""
    if stage.steps is not None:
        return float(stage.steps * args.train.batch_size * processes)
    return stage.tokens / args.data.seq_len


def plan_stages(args: RunArgs, plan: PlanArgs, corpus_rows: int) -> list[PlannedStage]:
    """Every stage priced in every mode, with `--cache auto`'s choice at these rates."""
    shape, rates, stages = (
        model_shape(args),
        plan_rates(plan, args.train.peak_tflops),
        StagePlan.from_args(args),
    )
    reads = {s.index: stage_rows_read(s, args, plan.gpus) for s in stages.stages}
    stored: list[Stored] = []
    planned = []
    for s in stages.stages:
        modes = MODES if s.frozen_layers else ("live",)
        costs = {
            m: stage_seconds(m, s, shape, rates, corpus_rows, reads[s.index], stored) for m in modes
        }
        choice, why = choose_cache(
            stages, s, corpus_rows, lambda t: reads[t.index], stored, (shape, rates)
        )
        planned.append(
            PlannedStage(s, reads[s.index], reads[s.index] / corpus_rows, choice, why, costs)
        )
        stored = stored_after(choice, s, corpus_rows, reads[s.index], stored)
    return planned


def totals(args: RunArgs, plan: PlanArgs, planned: list[PlannedStage]) -> dict[str, float]:
    """Seconds of live MSLT, cached MSLT (the choices) and the full model on the same tokens."""
    shape, rates = model_shape(args), plan_rates(plan, args.train.peak_tflops)
    rows = sum(p.rows_read for p in planned)
    full = rows * shape.train_row_flops(args.model.num_layers, True)
    return {
        "live_mslt_s": sum(p.costs["live"].wall_s for p in planned),
        "cached_mslt_s": sum(p.chosen.wall_s for p in planned),
        "full_model_s": full / rates.train_flops_per_s / rates.processes + rates.stage_overhead_s,
    }


def corpus_rows_of(args: RunArgs, plan: PlanArgs, prepared_rows: int | None = None) -> int:
    """Rows the stores hold: corpus tokens x views / seq_len (else the prepared data's)."""
    if plan.corpus_tokens is not None:
        return max(1, math.ceil(plan.corpus_tokens * args.data.views / args.data.seq_len))
    if prepared_rows is None:
        raise ConfigError(
            "the corpus size is unknown: pass --corpus_tokens (tokens of one view), or "
            "--train_examples N for a run on the first N prepared rows"
        )
    return prepared_rows


def duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


def stage_line(p: PlannedStage, seq_len: int, batch: int) -> dict:
    """One stage's row of the plan: what it trains, its rates and the choice."""
    live, chosen = p.costs["live"], p.chosen
    cached = p.costs.get("eager")  # a step that reads every row from the store
    fill = chosen.build_s if p.choice == "eager" else 0.0
    if p.choice == "write-through" and cached is not None:
        fill = chosen.wall_s - cached.train_s  # what filling adds to a step that only reads
    return {
        "stage": p.stage.name,
        "layers": f"{p.stage.frozen_layers}+{p.stage.trainable_layers}",
        "tokens": p.rows_read * seq_len,
        "epochs": p.epochs,
        "choice": p.choice,
        "tokens_per_s": p.rows_read * seq_len / chosen.wall_s,
        "step_live_s": live.step_s(batch),
        "step_cached_s": cached.step_s(batch) if cached else None,
        "fill_s": fill,
        "gb_written": chosen.bytes_written / 1e9,
        "gb_read": chosen.bytes_read / 1e9,
        "bound": (cached or live).bound,
        "wall_s": chosen.wall_s,
        "live_wall_s": live.wall_s,
        "modes_wall_s": {m: c.wall_s for m, c in p.costs.items()},
    }


def format_plan(lines: list[dict], total: dict[str, float]) -> str:
    """The plan as a markdown table and its totals."""
    head = (
        "| stage | frozen+trained | tokens | epochs | `--cache auto` | tokens/s | step live | "
        "step cached | build/fill | GB written | GB read | cached step | wall | wall live |"
    )
    out = [head, "|" + "---|" * 14]
    for x in lines:
        step_cached = "-" if x["step_cached_s"] is None else f"{x['step_cached_s'] * 1e3:.1f} ms"
        out.append(
            f"| {x['stage']} | {x['layers']} | {x['tokens']:.3g} | {x['epochs']:.2f} | "
            f"{x['choice']} | {x['tokens_per_s']:,.0f} | {x['step_live_s'] * 1e3:.1f} ms | "
            f"{step_cached} | {duration(x['fill_s'])} | {x['gb_written']:,.1f} | "
            f"{x['gb_read']:,.1f} | {x['bound']}-bound | {duration(x['wall_s'])} | "
            f"{duration(x['live_wall_s'])} |"
        )
    out.append("")
    out.append(
        f"live MSLT {duration(total['live_mslt_s'])}, cached MSLT "
        f"{duration(total['cached_mslt_s'])}, full model {duration(total['full_model_s'])} "
        f"(cached / live {total['cached_mslt_s'] / total['live_mslt_s']:.2f}, "
        f"cached / full {total['cached_mslt_s'] / total['full_model_s']:.2f})"
    )
    return "\n".join(out)


def make_plan(args: RunArgs, plan: PlanArgs) -> dict:
    """The whole plan: rates, each stage's line and the totals (what plan.py prints)."""
    rows = corpus_rows_of(args, plan, args.data.train_examples or None)
    planned = plan_stages(args, plan, rows)
    return {
        "corpus_rows": rows,
        "shape": model_shape(args).__dict__,
        "rates": plan_rates(plan, args.train.peak_tflops).to_dict(),
        "stages": [stage_line(p, args.data.seq_len, args.train.batch_size) for p in planned],
        "why": {p.stage.name: p.why for p in planned},
        "totals": totals(args, plan, planned),
    }
