"""One metrics writer, the run clock, and the end-of-run summary (table + plot)."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cached_mslt.rundir import METRICS, append_line, write_atomic


@dataclass
class RunClock:
    """Counters that run across stages: every method reports the same ones, and wall-clock
    includes cache builds, so a comparison charges caching for what it costs."""

    step: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    # CPU seconds of this process (all its threads): on a shared machine wall time also
    # measures the neighbours; CPU time of a 1-thread run measures only our work.
    cpu_s: float = 0.0
    flops: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Stopwatch:
    """Adds elapsed wall and CPU time to a RunClock on `tick`, so resumed runs continue the
    count."""

    def __init__(self, clock: RunClock):
        self.clock = clock
        self._restart()

    def _restart(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside is not added to the clock."""
        self.tick()
        yield
        self._restart()

    def tick(self) -> float:
        wall, cpu = time.perf_counter(), time.process_time()
        self.clock.wall_s += wall - self._wall
        self.clock.cpu_s += cpu - self._cpu
        self._wall, self._cpu = wall, cpu
        return self.clock.wall_s


def clock_fields(clock: RunClock) -> dict[str, Any]:
    """The clock as a metrics line carries it (the training loop's rounding): a line that
    is not a training step (a store build's end, a phase's end, the final evaluation)
    still places itself on the run's clock, so curves and tables read the same total."""
    return {
        "step": clock.step,
        "tokens": clock.tokens,
        "wall_s": round(clock.wall_s, 3),
        "cpu_s": round(clock.cpu_s, 3),
        "flops": clock.flops,
    }


class MetricsWriter:
    """Appends one JSON object per line to `metrics.jsonl` (main process only) and forwards
    the same values to Accelerate's trackers when the run configured any."""

    def __init__(
        self,
        run_dir: str | Path,
        accelerator=None,
        base: dict[str, Any] | None = None,
        filename: str = METRICS,
    ):
        self.path = Path(run_dir) / filename
        self.accelerator = accelerator
        self.base = dict(base or {})
        self.enabled = accelerator is None or accelerator.is_main_process

    def log(self, record: dict[str, Any]) -> None:
        record = {**self.base, **record}
        if not self.enabled:
            return
        append_line(self.path, json.dumps(record))
        if self.accelerator is not None and self.accelerator.trackers:
            numbers = {k: v for k, v in record.items() if isinstance(v, int | float)}
            self.accelerator.log(numbers, step=record.get("step"))

    def truncate_after(self, stage: Any, step: int) -> None:
        """Drop lines a resumed stage will write again (those past its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [
            json.dumps(r)
            for r in read_jsonl(self.path)
            if not (r.get("stage") == stage and r.get("step", 0) > step)
        ]  # torn lines are dropped here: the resumed stage writes its steps again
        write_atomic(self.path, "".join(line + "\n" for line in kept))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file a run appends to. A line that does not parse was
    torn (disk full, a killed writer): skipped with a warning naming file and line, so
    one lost log line never stops a run or its report."""
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(
                f"{path}:{number}: skipped a torn line (a write cut short by a full disk or "
                f"a killed process): {line[:60]!r}",
                stacklevel=2,
            )
    return records


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if p.is_dir():
        p = p / METRICS
    if not p.exists():
        return []
    return read_jsonl(p)


# Digits people read, by what a column holds (its name): token rates and counts whole,
# seconds to a tenth, losses to three places, percentages to one, ratios to two.
def _digits(column: str) -> int:
    words = column.replace("_", " ").split() or [""]
    if "tokens/s" in words:
        return 0
    if "s" in (words[0], words[-1]) or column.endswith("%"):
        return 1
    if "loss" in words:
        return 3
    if words[0] == "lr":
        return -1  # general format: 0.001, 5e-04
    return 2 if words[0] == "x" or "/" in words else 3


def _fmt(value: Any, column: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        digits = _digits(column)
        if digits < 0:
            return f"{value:g}"
        return f"{value:,.{digits}f}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c), c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def stage_speeds(
    records: list[dict[str, Any]], peak_flops_per_s: float | None, devices: int = 1
) -> dict[str, dict[str, float | None]]:
    """Per stage: training tokens/s, FLOP/s and MFU between its first and last log lines.

    The clock is cumulative and paused during validation, and a stage's cache build (wall
    time and FLOPs) is charged before its first step, so the span between two log lines of
    one stage is training only (checkpoints included). A stage with one log line has no
    span: None. MFU divides by the peak of all `devices` (counters are summed over ranks).
    """
    spans: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if "stage" in r and "wall_s" in r and "train_loss" in r:
            spans.setdefault(str(r["stage"]), []).append(r)
    out: dict[str, dict[str, float | None]] = {}
    for stage, lines in spans.items():
        first, last = lines[0], lines[-1]
        wall = last["wall_s"] - first["wall_s"]
        if wall <= 0:
            out[stage] = {"tokens_per_s": None, "flops_per_s": None, "mfu": None}
            continue
        flops_per_s = (last["flops"] - first["flops"]) / wall
        mfu = flops_per_s / (peak_flops_per_s * devices) if peak_flops_per_s else None
        out[stage] = {
            "tokens_per_s": (last["tokens"] - first["tokens"]) / wall,
            "flops_per_s": flops_per_s,
            "mfu": mfu,
        }
    return out


def below_unigram(loss: float | None, unigram: float | None) -> float | None:
    """How far below the unigram loss a loss is, in percent of it (what a loss means)."""
    if loss is None or not unigram or math.isnan(loss):
        return None
    return 100.0 * (1.0 - loss / unigram)


def plot_curves(
    curves: dict[str, list[dict[str, Any]]],
    x: str,
    path: str | Path,
    title: str,
    xlabel: str,
    unigram: float | None = None,
) -> None:
    """Validation loss against `x` (wall_s or flops), one line per curve, and the unigram
    loss of the data as a dashed line: the level of a model that only counts words."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, records in curves.items():
        points = [(r[x], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    if unigram is not None:
        ax.axhline(unigram, color="grey", linestyle="--", linewidth=1, label="unigram")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation MLM loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
