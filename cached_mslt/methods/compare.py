"""Run several methods on the same data and budget, then report: a table (wall-clock,
FLOPs, final validation loss, time to reach the baseline's final loss) and plots of
validation loss against wall-clock and against FLOPs."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from accelerate import PartialState

from cached_mslt.config import ConfigError, MethodArgs, RunArgs
from cached_mslt.data import load_prepared, prepared_manifest
from cached_mslt.evaluation import (
    PROBE_FILE,
    RESULTS_FILE,
    FinetuneArgs,
    evaluate_checkpoint,
)
from cached_mslt.methods.harness import (
    FINISHED,
    method_budget,
    phase_shortfall,
    run_method,
    run_settings,
)
from cached_mslt.rundir import RunLayout
from cached_mslt.training import (
    MEASURES,
    MIN_TRAINED_SHARE,
    below_unigram,
    markdown_table,
    plot_curves,
    read_metrics,
)

BASELINE = "full"
# The report table's columns, then one per fine-tuned task.
REPORT_COLUMNS = (
    "method",
    "status",
    "lr",
    "wall s",
    "cpu s",
    "wall / full",
    "cpu / full",
    "PFLOPs",
    "tokens",
    "val loss @ half",
    "final val loss",
    "below unigram %",
    "s to baseline loss",
    "x baseline",
)


def compare_dir(args: RunArgs, method: MethodArgs) -> Path:
    return Path(method.compare_dir or f"runs/compare-{args.model.preset}")


def run_comparison(
    args: RunArgs, method: MethodArgs, finetune_args: FinetuneArgs | None = None
) -> str:
    """Every method in `method.methods`, sequentially with the same seed and data; a
    failed method is reported in the table and the others still run. With
    `method.finetune`, each final checkpoint is then fine-tuned on `finetune_args.task`."""
    root = compare_dir(args, method)
    wanted = None
    if method.reuse:  # one settings record serves every method's check
        fingerprint = load_prepared(args.data.prepared_dir).manifest["fingerprint"]
        wanted = run_settings(args, method, fingerprint)
    for name in method.methods:
        result = finished_run(root / name, wanted) if wanted else None
        if result is None and method.learning_rates:
            result = sweep_learning_rate(name, args, method, root / name)
        elif result is None:
            result = run_method(name, args, method, root / name)
        else:
            PartialState().print(f"{name}: reusing the finished run in {root / name}")
        if method.finetune and result["status"] in FINISHED:
            evaluate_method(root / name, finetune_args or FinetuneArgs())
    if not PartialState().is_main_process:
        return ""
    return write_report(root, method.methods, args, method)


def sweep_learning_rate(
    name: str, args: RunArgs, method: MethodArgs, run_dir: Path
) -> dict[str, Any]:
    """Run `name` once per learning rate in `method.learning_rates` and make the best
    (lowest final validation loss) the method's run: its metrics, result and final
    checkpoint are copied to `run_dir`, and the sweep is recorded beside them, so no method
    is compared at a learning rate that handicaps it. With `sweep_budget_fraction` < 1 the
    trials run on that share of the budget (in run_dir/sweep/) and the winner alone then
    runs on the whole budget."""
    short = method.sweep_budget_fraction < 1
    trial_method = scaled_budget(method, method.sweep_budget_fraction) if short else method
    sweep, best = [], None
    for lr in method.learning_rates:
        trial_dir = run_dir / "sweep" / f"lr-{lr:g}" if short else run_dir / f"lr-{lr:g}"
        final, result = _trial(name, args, trial_method, trial_dir, lr)
        sweep.append({"learning_rate": lr, "status": result["status"], "final val loss": final})
        if final is not None and (best is None or final < best[1]):
            best = (trial_dir, final, result, lr)
    if short and best is not None:
        trial_dir = run_dir / f"lr-{best[3]:g}"
        final, result = _trial(name, args, method, trial_dir, best[3])
        best = (trial_dir, final, result, best[3]) if final is not None else None
    if not PartialState().is_main_process:
        return best[2] if best else {"status": "failed"}
    if best is None:
        result = {"method": name, "status": "failed", "error": "every learning rate failed"}
    else:
        trial_dir, _, result, _ = best
        trial, run = RunLayout(trial_dir), RunLayout(run_dir)
        shutil.copy(trial.metrics, run.metrics)
        shutil.rmtree(run.final_model, ignore_errors=True)
        shutil.copytree(trial.final_model, run.final_model)
        result = {**result, "final_model": str(run.final_model)}
    fingerprint = prepared_manifest(args.data.prepared_dir)["fingerprint"]  # the trials loaded it
    result.update(
        learning_rate_sweep=sweep,
        sweep_budget_fraction=method.sweep_budget_fraction,
        settings=run_settings(args, method, fingerprint),
    )
    RunLayout(run_dir).result.write_text(json.dumps(result, indent=2, default=str))
    return result


def _trial(
    name: str, args: RunArgs, method: MethodArgs, run_dir: Path, lr: float
) -> tuple[float | None, dict[str, Any]]:
    """One run of `name` at learning rate `lr`: its final validation loss (None if it
    failed) and its result."""
    result = run_method(
        name, replace(args, train=replace(args.train, learning_rate=lr)), method, run_dir
    )
    final = result.get("final_val_loss") if result["status"] in FINISHED else None
    return final, result


def scaled_budget(method: MethodArgs, fraction: float) -> MethodArgs:
    """The same comparison settings on `fraction` of the budget, in every measure given."""
    budget = method_budget(method)
    return replace(
        method,
        **{
            f"budget_{measure}": None
            if getattr(budget, measure) is None
            else getattr(budget, measure) * fraction
            for measure in MEASURES
        },
    )


def finished_run(run_dir: Path, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """The result of a finished run with the `wanted` settings (`run_settings`), None if
    there is none to reuse (missing, failed, or written before the report counted a
    method's whole charge: no `final_val_loss`); a run with other settings is an error,
    never silently replaced."""
    path = RunLayout(run_dir).result
    result = RunLayout(run_dir).read_result()
    if result is None:
        return None
    if result.get("status") not in FINISHED or "final_val_loss" not in result:
        return None
    recorded = result.get("settings")
    if recorded is None:
        raise ConfigError(
            f"{path} does not record its settings (written before they were kept), so --reuse "
            "cannot check it matches this run; train it again without --reuse"
        )
    if recorded != wanted:
        diffs = [
            f"{group}.{key}: {recorded.get(group, {}).get(key)!r} there, {value!r} here"
            for group, values in wanted.items()
            for key, value in values.items()
            if recorded.get(group, {}).get(key) != value
        ]
        raise ConfigError(
            f"{run_dir} was trained with other settings ({'; '.join(diffs)}); drop --reuse to "
            "train it again, or pick another --compare_dir"
        )
    return result


def evaluate_method(run_dir: Path, fargs: FinetuneArgs) -> None:
    """Evaluate a method's final checkpoint on every task; results land in run_dir/finetune."""
    evaluate_checkpoint(RunLayout(run_dir).final_model, fargs, output_dir=run_dir / "finetune")


def finetune_columns(run_dir: Path) -> dict[str, str]:
    """`<task> acc %` -> "mean ± std" from what `finetune` wrote, `<task> probe %` from `linear_probe`."""
    columns = {}
    for path in sorted((run_dir / "finetune").glob(f"*/{RESULTS_FILE}")):
        r = json.loads(path.read_text())
        mean, std = 100 * r["accuracy_mean"], 100 * r["accuracy_std"]
        columns[f"{r['task']} acc %"] = f"{mean:.1f} ± {std:.1f}"
    for path in sorted((run_dir / "finetune").glob(f"*/{PROBE_FILE}")):
        r = json.loads(path.read_text())
        columns[f"{r['task']} probe %"] = f"{100 * r['test_accuracy']:.1f}"
    return columns


def time_to_loss(
    records: list[dict[str, Any]], target: float | None, x: str = "wall_s"
) -> float | None:
    """When (in `x`: wall_s, cpu_s, flops or tokens) the validation loss first reached
    `target`, interpolated linearly between the two evaluations around the crossing; None
    if it never did. Evaluations are sparse, so the first one at or below the target alone
    would overstate the time by up to an evaluation interval."""
    if target is None:
        return None
    points = [(r[x], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    for i, (at, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return at
            (at0, loss0) = points[i - 1]
            return at0 + (at - at0) * (loss0 - target) / (loss0 - loss)
    return None


def loss_at(records: list[dict[str, Any]], when: float, x: str = "wall_s") -> float | None:
    """The validation loss at `when` (in `x`), interpolated between evaluations; None before
    the first evaluation or after the last."""
    points = [(r[x], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    for (at0, loss0), (at1, loss1) in zip(points, points[1:]):
        if at0 <= when <= at1:
            return loss0 if at1 == at0 else loss0 + (loss1 - loss0) * (when - at0) / (at1 - at0)
    return points[-1][1] if points and points[-1][0] == when else None


def lower_share(
    records: list[dict[str, Any]], other: list[dict[str, Any]], after: float, x: str
) -> tuple[int, int]:
    """At how many of its evaluations past `after` (in `x`) a run's validation loss was
    below `other`'s at the same time (interpolated), out of how many both runs cover."""
    lower = total = 0
    for r in records:
        if r.get("val_loss") is None or r[x] <= after:
            continue
        theirs = loss_at(other, r[x], x)
        if theirs is not None:
            total += 1
            lower += r["val_loss"] < theirs
    return lower, total


def cache_gain_line(curves: dict[str, list[dict]], clock: str) -> list[str]:
    """mslt-cached against mslt-live once stage 1 is over (the stages are the same until
    then): the cache's own gain, when both ran."""
    cached, live = curves.get("mslt-cached", []), curves.get("mslt-live", [])
    stage_one = [r[clock] for r in cached + live if r.get("stage") == "stage-1"]
    if not cached or not live or not stage_one:
        return []
    lower, total = lower_share(cached, live, max(stage_one), clock)
    return [
        f"After stage 1, `mslt-cached`'s validation loss was below `mslt-live`'s at {lower} "
        f"of its {total} evaluations (same {_CLOCK_NAME[clock]})."
    ]


def chosen_learning_rate(result: dict[str, Any]) -> float | None:
    """The learning rate a method ran at: the best of its sweep, else the run's own."""
    tried = [t for t in result.get("learning_rate_sweep", []) if t["final val loss"] is not None]
    if tried:
        return min(tried, key=lambda t: t["final val loss"])["learning_rate"]
    return result.get("settings", {}).get("train", {}).get("learning_rate")


def sweep_lines(root: Path, methods: list[str]) -> list[str]:
    """One line per swept method: every learning rate tried and the loss it ended at."""
    lines = []
    for name in methods:
        result = RunLayout(root / name).read_result() or {}
        tried = result.get("learning_rate_sweep")
        if tried:
            parts = [
                f"{t['learning_rate']:g}: "
                + (f"{t['final val loss']:.3f}" if t["final val loss"] is not None else t["status"])
                for t in tried
            ]
            lines.append(f"- `{name}` learning-rate sweep (final val loss): {', '.join(parts)}")
    return lines


def report_clock(method: MethodArgs) -> str:
    """The time a comparison is read in: CPU seconds when the budget was given in them
    (a shared machine, where wall-clock also counts the neighbours), else wall-clock."""
    return "cpu_s" if method.budget_cpu_s is not None else "wall_s"


def read_curves(root: Path, methods: list[str]) -> dict[str, list[dict]]:
    """Each method's metrics.jsonl, read once for the table, the plots and the report."""
    return {name: read_metrics(root / name) for name in methods}


def summarize(
    root: Path,
    methods: list[str],
    unigram: float | None = None,
    clock: str = "wall_s",
    curves: dict[str, list[dict]] | None = None,
) -> list[dict[str, Any]]:
    """One row per method from its result.json and metrics.jsonl (`curves`, if read
    already); times in `clock`."""
    rows, curves = [], curves if curves is not None else read_curves(root, methods)
    for name in methods:
        result = RunLayout(root / name).read_result() or {"status": "missing"}
        final = final_loss(result, curves[name])
        rows.append(
            {
                **finetune_columns(root / name),
                **cost_columns(result, curves[name]),
                "method": name,
                "status": status_cell(result),
                "lr": chosen_learning_rate(result),
                "final val loss": final,
                "below unigram %": below_unigram(final, unigram),
                "error": result.get("error"),
                "notes": result.get("status_notes", []),
            }
        )
    base = next((r for r in rows if r["method"] == BASELINE), None)
    target = base["final val loss"] if base else None
    base_time = base and base[_COLUMN[clock]]
    for row in rows:
        if base_time and row["wall s"] is not None:
            row["wall / full"] = row["wall s"] / base["wall s"]
            row["cpu / full"] = row["cpu s"] / base["cpu s"]
        records = curves[row["method"]]
        row["s to baseline loss"] = time_to_loss(records, target, clock)
        if row["s to baseline loss"] is not None and base_time:
            row["x baseline"] = row["s to baseline loss"] / base_time
        if base_time:  # the loss each method had when half the baseline's time was gone
            row["val loss @ half"] = loss_at(records, base_time / 2, clock)
    return rows


_COLUMN = {"wall_s": "wall s", "cpu_s": "cpu s"}


def cost_columns(result: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """A method's whole charge against its budget: the run's own clock (builds included,
    whether or not a training step followed them), not its last training line; a run
    without a recorded clock falls back to its last metrics line."""
    clock = result.get("clock") or (records[-1] if records else None)
    if clock is None:
        return {"wall s": None, "cpu s": None, "PFLOPs": None, "tokens": None}
    return {
        "wall s": clock["wall_s"],
        "cpu s": clock["cpu_s"],
        "PFLOPs": clock["flops"] / 1e15,
        "tokens": clock["tokens"],
    }


def final_loss(result: dict[str, Any], records: list[dict[str, Any]]) -> float | None:
    """The final model's validation loss (result.json's `final_val_loss`); for a run
    written before it was measured, the last evaluation in its metrics."""
    if "final_val_loss" in result:
        return result["final_val_loss"]
    evals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    return evals[-1] if evals else None


def status_cell(result: dict[str, Any]) -> str:
    """The status column: the run's status, the phases that fell short, and the stages
    that ran live because their store build would not fit their share (the notes below
    the table say why)."""
    status = result.get("status", "missing")
    short = [p["phase"] for p in result.get("phases", []) if phase_shortfall(p)]
    live = [p["phase"] for p in result.get("phases", []) if p.get("live_under_budget")]
    parts = [f"{status}: {', '.join(short)}" if short else status]
    parts += [f"live: {', '.join(live)}"] if live else []
    return "; ".join(parts)


_CLOCK_NAME = {"wall_s": "wall-clock", "cpu_s": "CPU seconds"}


def write_plots(
    root: Path, curves: dict[str, list[dict]], clock: str, unigram: float | None
) -> None:
    """Validation loss against wall-clock, FLOPs and (under a CPU budget) CPU seconds."""
    plot_curves(
        curves,
        "wall_s",
        root / "val_loss_vs_wall.png",
        "validation loss vs wall-clock",
        "wall-clock seconds (cache builds included, evaluation excluded)",
        unigram=unigram,
    )
    if clock == "cpu_s":
        plot_curves(
            curves,
            "cpu_s",
            root / "val_loss_vs_cpu.png",
            "validation loss vs CPU seconds",
            "CPU seconds of the process (cache builds included, evaluation excluded)",
            unigram=unigram,
        )
    plot_curves(
        curves,
        "flops",
        root / "val_loss_vs_flops.png",
        "validation loss vs FLOPs",
        "training FLOPs (model count)",
        unigram=unigram,
    )


def write_report(root: Path, methods: list[str], args: RunArgs, method: MethodArgs) -> str:
    unigram = (prepared_manifest(args.data.prepared_dir) or {}).get("unigram_loss")
    clock = report_clock(method)
    curves = read_curves(root, methods)
    rows = summarize(root, methods, unigram, clock, curves)
    write_plots(root, curves, clock, unigram)
    columns = list(REPORT_COLUMNS)
    columns += sorted({k for r in rows for k in r if k.endswith((" acc %", " probe %"))})
    failures = [f"- `{r['method']}` failed: {r['error']}" for r in rows if r["error"]]
    notes = [f"- `{r['method']}`: {note}" for r in rows for note in r["notes"]]
    sweeps = sweep_lines(root, methods)
    time = _CLOCK_NAME[clock]
    plots = ["val_loss_vs_wall.png", "val_loss_vs_flops.png"]
    plots += ["val_loss_vs_cpu.png"] if clock == "cpu_s" else []
    text = "\n".join(
        [
            f"# Method comparison: preset `{args.model.preset}`, {method_budget(method).describe()} each",
            "",
            markdown_table(rows, columns),
            "",
            f"Times are {time}. `wall s`, `cpu s`, `PFLOPs`, `tokens`: the method's whole "
            "charge against its budget (cache builds included). `wall / full`, `cpu / full`: "
            f"the method's whole pretraining time over `{BASELINE}`'s. `final val loss`: the "
            "final model's, measured after its last phase. `status`: `short` names the phases "
            f"that trained no step or under {MIN_TRAINED_SHARE:.0%} of their share, `live` "
            "the stages that ran live because a store build would not have fit their share "
            f"(the notes below say why). `val loss @ half`: validation loss at half `{BASELINE}`'s "
            f"time. `s to baseline loss`: when the method's validation loss first reached "
            f"`{BASELINE}`'s final validation loss, interpolated between evaluations (`-`: "
            "never, within the budget); `x baseline`: that time over the baseline's whole run. "
            f"Plots: {', '.join(f'`{p}`' for p in plots)} (dashed: the unigram loss).",
            "",
            "Unigram loss of the validation targets (token frequencies alone): "
            + (f"{unigram:.3f}." if unigram is not None else "not recorded by this prepared data."),
            *(
                [""] + cache_gain_line(curves, clock)
                if {"mslt-cached", "mslt-live"} <= set(methods)
                else []
            ),
            *([""] + notes if notes else []),
            *([""] + sweeps if sweeps else []),
            *([""] + failures if failures else []),
            "",
        ]
    )
    (root / "report.md").write_text(text)
    (root / "report.json").write_text(json.dumps(rows, indent=2))
    print(text)
    return text
