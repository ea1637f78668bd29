"""What `pipelines/inspect_cache.py` does: resolve a store or a run, summarise, then run the
analyses asked for, turning store errors into statuses rather than tracebacks.

A store whose status is incomplete or corrupt is summarised but not analysed; a stale
store is analysed (its contents are still what some frozen bottom computed) and
reported as stale. The exit code is the worst status found (summary.EXIT_CODES).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cached_mslt.inspect.api import block_ranges, iter_blocks, open_store
from cached_mslt.inspect.similarity import Similarity, StoresDisagreeError, similarity
from cached_mslt.inspect.stats import HiddenStats, hidden_stats
from cached_mslt.inspect.summary import (
    EXIT_CODES,
    StageEntry,
    StoreSummary,
    is_store,
    prepared_dir_of,
    run_storage_options,
    summarize_run,
    summarize_store,
)
from cached_mslt.inspect.text import (
    Neighbour,
    RowText,
    nearest_rows,
    original_text,
    row_text,
)
from cached_mslt.rundir import RunLayout
from storage import (
    ActivationStore,
    CorruptStoreError,
    IncompleteStoreError,
    StaleStoreError,
)

if TYPE_CHECKING:
    from cached_mslt.inspect.probe import ProbeResult

ANALYSABLE = ("ok", "stale")


class InspectError(ValueError):
    """The request cannot be served (e.g. no prepared data to show text); exit code 2."""


@dataclass
class InspectOptions:
    path: str
    stats: bool = False
    rows: int | None = None  # None: every row
    compare: str | None = None
    similarity: bool = False
    show_row: int | None = None
    nearest: int | None = None
    k: int = 5
    probe: bool = False
    probe_examples: int | None = None
    plots: str | None = None
    run: str | None = None
    stage: int | None = None
    verify: bool = False
    prepared: str | None = None
    task_dir: str = "data/tasks"
    # fsspec options of object-store URLs (endpoint, credentials): used, never printed
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Report:
    target: str
    run_dir: str | None
    stages: list[StageEntry] = field(default_factory=list)
    stores: dict[str, StoreSummary] = field(default_factory=dict)  # label -> summary
    stats: dict[str, HiddenStats] = field(default_factory=dict)
    similarity: Similarity | None = None
    row: RowText | None = None
    neighbours: list[tuple[Neighbour, str]] = field(default_factory=list)
    probe: list[ProbeResult] = field(default_factory=list)
    probe_majority: float | None = None
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def exit_code(self) -> int:
        return max((s.exit_code for s in self.stores.values()), default=0)


def _label(summary: StoreSummary) -> str:
    stage = summary.provenance.get("stage")
    return f"stage-{stage}" if stage is not None else Path(summary.url).name


def _mark(report: Report, label: str, status: str, error: Exception) -> None:
    summary = report.stores[label]
    if EXIT_CODES[status] > summary.exit_code:
        summary.status = status
    summary.problem = str(error)


def _open(report: Report, label: str) -> ActivationStore | None:
    """A read handle on an analysable store, or None (and the reason recorded)."""
    summary = report.stores[label]
    if summary.status not in ANALYSABLE:
        report.notes.append(f"{label}: not analysed ({summary.status})")
        return None
    return open_store(summary.url, storage_options=report.storage_options)


def gather(opts: InspectOptions) -> Report:
    path = Path(opts.path)
    if "://" in opts.path or is_store(path):
        run = RunLayout(opts.run) if opts.run else RunLayout.of_store(opts.path)
        report = Report(opts.path, str(run.root) if run else None)
        report.storage_options = _options(run, opts)
        summary = summarize_store(opts.path, run.root if run else None, report.storage_options)
        report.stores[_label(summary)] = summary
    elif path.is_dir():
        report = Report(opts.path, opts.path)
        report.storage_options = _options(RunLayout(path), opts)
        report.stages = summarize_run(path, report.storage_options)
        report.stores = {f"stage-{e.stage}": e.store for e in report.stages if e.store}
    else:
        report = Report(opts.path, None)
        report.stores[opts.path] = summarize_store(opts.path)  # reports it missing
        return report
    analyse(report, opts)
    return report


def _options(run: RunLayout | None, opts: InspectOptions) -> dict[str, Any]:
    """--storage_options over what the run's config.json recorded (its endpoint)."""
    return run_storage_options(run, opts.storage_options) if run else dict(opts.storage_options)


def analyse(report: Report, opts: InspectOptions) -> None:
    if opts.verify:
        for label in list(report.stores):
            _guarded(report, label, verify_store)
    if opts.stats:
        for label in list(report.stores):
            if (
                result := _guarded(report, label, lambda s: hidden_stats(s, opts.rows))
            ) is not None:
                report.stats[label] = result
    if opts.compare or opts.similarity:
        _similarity(report, opts)
    if opts.show_row is not None or opts.nearest is not None:
        _text(report, opts)
    if opts.probe:
        from cached_mslt.inspect.probe import majority_accuracy, probe_run  # loads BBC + models

        if report.run_dir is None:
            raise InspectError("--probe needs a run (checkpoints): pass a run directory or --run")
        report.probe = probe_run(
            report.run_dir, task_dir=opts.task_dir, max_examples=opts.probe_examples
        )
        report.probe_majority = majority_accuracy(opts.task_dir)
    if opts.plots:
        from cached_mslt.inspect.plots import write_plots  # matplotlib only when asked

        report.plots = [str(p) for p in write_plots(opts.plots, report.stats, report.similarity)]


def verify_store(store: ActivationStore) -> int:
    """Read every block (checksums) and check it is finite: stores written before builds
    refused non-finite activations may hold a diverged model's NaN. Returns blocks read."""
    ranges = block_ranges(store)
    for (start, stop), block in zip(ranges, iter_blocks(store, ranges), strict=True):
        finite = block["hidden"].isfinite()
        if not bool(finite.all()):
            first = start + int((~finite.flatten(1).all(1)).nonzero()[0, 0])
            raise CorruptStoreError(
                f"{store.url}: rows {start}-{stop} hold {int((~finite).sum())} non-finite hidden "
                f"values (NaN or inf, first in row {first}); expected finite activations. The "
                f"model that built it diverged: rebuild the store from finite weights"
            )
    return len(ranges)


def _guarded(report: Report, label: str, work) -> Any:
    """`work(store)` on an analysable store; store errors become its status."""
    try:
        store = _open(report, label)
        return None if store is None else work(store)
    except CorruptStoreError as e:
        _mark(report, label, "corrupt", e)
    except IncompleteStoreError as e:
        _mark(report, label, "incomplete", e)
    except StaleStoreError as e:
        _mark(report, label, "stale", e)
    return None


def _similarity(report: Report, opts: InspectOptions) -> None:
    labels = [lab for lab in report.stores if report.stores[lab].status in ANALYSABLE]
    if opts.compare:
        mine = _selected(report, opts)
        other = summarize_store(opts.compare, storage_options=report.storage_options)
        report.stores[f"compare:{_label(other)}"] = other
        labels = [lab for lab in (mine, f"compare:{_label(other)}") if lab]
    stores = [_guarded(report, lab, lambda s: s) for lab in labels]
    if len(stores) < 2 or any(s is None for s in stores):
        report.notes.append("similarity needs two readable stores; skipped")
        return
    try:
        report.similarity = similarity(stores, opts.rows, labels)
    except StoresDisagreeError as e:
        raise InspectError(str(e)) from e
    except CorruptStoreError as e:  # the message names the store that failed
        for label in labels:
            if report.stores[label].url in str(e):
                _mark(report, label, "corrupt", e)


def _selected(report: Report, opts: InspectOptions) -> str | None:
    """The one store that per-store actions (a row, neighbours, --compare) apply to:
    `--stage`, else the deepest analysable one; None (and a note) if there is none."""
    if opts.stage is not None:
        label = f"stage-{opts.stage}"
        if label not in report.stores:
            raise InspectError(f"no store for stage {opts.stage}; stores: {list(report.stores)}")
        return label
    usable = [lab for lab, s in report.stores.items() if s.status in ANALYSABLE]
    if not usable:
        report.notes.append("no readable store to look at")
    return usable[-1] if usable else None


def _text(report: Report, opts: InspectOptions) -> None:
    from cached_mslt.data import load_prepared

    label = _selected(report, opts)
    if label is None:
        return
    prepared_dir = Path(opts.prepared) if opts.prepared else None
    if prepared_dir is None and report.run_dir:
        prepared_dir = prepared_dir_of(RunLayout(report.run_dir))
    if prepared_dir is None:
        raise InspectError("showing text needs the prepared data: pass --prepared DIR")
    data = load_prepared(prepared_dir)
    summary = report.stores[label]
    if summary.fingerprint.get("data") != data.manifest["fingerprint"]:
        _mark(
            report,
            label,
            "stale",
            StaleStoreError(
                f"{summary.url} was built from prepared data "
                f"{summary.fingerprint.get('data', '?')[:12]}, {prepared_dir} holds "
                f"{data.manifest['fingerprint'][:12]}: its row_index would point at other text"
            ),
        )
        return
    tokenizer = data.tokenizer()

    def lookup(store: ActivationStore) -> None:
        if opts.show_row is not None:
            report.row = row_text(store, opts.show_row, data.train, tokenizer)
        if opts.nearest is not None:
            report.row = report.row or row_text(store, opts.nearest, data.train, tokenizer)
            for n in nearest_rows(store, opts.nearest, opts.k, opts.rows):
                report.neighbours.append((n, original_text(data.train, n.row_index, tokenizer)))

    _guarded(report, label, lookup)


def to_json(report: Report) -> str:
    d: dict[str, Any] = {
        "target": report.target,
        "run_dir": report.run_dir,
        "exit_code": report.exit_code,
        "stores": {k: v.to_dict() for k, v in report.stores.items()},
    }
    if report.stages:
        d["stages"] = [
            {"stage": e.stage, "mode": e.mode, "layers": e.num_layers, "frozen": e.frozen_layers}
            for e in report.stages
        ]
    if report.stats:
        d["stats"] = {k: v.to_dict() for k, v in report.stats.items()}
    if report.similarity:
        d["similarity"] = report.similarity.to_dict()
    if report.row:
        d["row"] = report.row.to_dict()
    if report.neighbours:
        d["nearest"] = [{**vars(n), "text": text} for n, text in report.neighbours]
    if report.probe:
        d["probe"] = [vars(r) for r in report.probe] + [{"majority_class": report.probe_majority}]
    d |= {"plots": report.plots, "notes": report.notes}
    return json.dumps(d, indent=2, allow_nan=False, default=str)
