"""The terminal text of an inspect report (`--json` prints `report.to_json` instead)."""

from __future__ import annotations

import numpy as np

from cached_mslt.inspect.report import Report
from cached_mslt.inspect.similarity import Similarity
from cached_mslt.inspect.stats import HiddenStats
from cached_mslt.inspect.summary import StoreSummary


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:,.1f} MB"


def format_summary(label: str, s: StoreSummary) -> str:
    head = f"{label}: {s.url}  [{s.status.upper()}]"
    if not s.spec:
        return f"{head}\n  {s.problem}"
    spec, prov = s.spec, s.provenance
    lines = [head]
    if s.problem:
        lines.append(f"  problem: {s.problem}")
    lines += [
        f"  stage {prov.get('stage', '?')}, {prov.get('frozen_layers', '?')} frozen layers, "
        f"built {prov.get('built', '?')}; created {prov.get('created_at')}, "
        f"completed {prov.get('completed_at')}, cached-mslt {prov.get('package_version')}",
        f"  hidden [{spec['num_rows']}, {spec['seq_len']}, {spec['hidden_size']}] "
        f"{spec['dtype']}, codec {spec['codec']} + crc32c, chunks of {spec['rows_per_chunk']} "
        f"rows, {spec['chunks_per_shard']} chunks per shard",
    ]
    if s.num_shards is not None:
        ratio = s.compression_ratio
        lines += [
            f"  shards done {s.shards_done}/{s.num_shards}; on disk {_mb(s.disk_bytes)}, "
            f"logical {_mb(s.logical_bytes)}, compression ratio "
            f"{'?' if ratio is None else f'{ratio:.3f}'}",
        ]
    fp = ", ".join(f"{k} {v[:12]}" for k, v in s.fingerprint.items())
    lines.append(f"  fingerprint: {fp}")
    if s.validity is not None:
        verdict = {True: "valid", False: "NOT valid", None: "validity unknown"}[s.validity.valid]
        lines.append(f"  {verdict} for run {s.validity.run_dir}:")
        lines += [f"    {k}: {v}" for k, v in s.validity.checks.items()]
    return "\n".join(lines)


def format_stats(label: str, s: HiddenStats) -> str:
    q = s.norm_quantiles()
    pos = s.position_norm
    middle = np.nanmean(pos[1:-1]) if len(pos) > 2 else float("nan")
    outliers = ", ".join(f"{d} (rms {s.rms[d]:.2f})" for d in s.outlier_dims[:8])
    return "\n".join(
        [
            f"{label}: {s.rows:,} rows, {s.tokens:,} tokens",
            f"  token norm: mean {s.norm_mean:.3f}, p01 {q['p01']:.3f}, median {q['p50']:.3f}, "
            f"p99 {q['p99']:.3f}, min {s.norm_min:.3f}, max {s.norm_max:.3f}",
            f"  per-dim mean in [{s.mean.min():.3f}, {s.mean.max():.3f}]; std median "
            f"{np.median(s.std):.3f}, range [{s.std.min():.3f}, {s.std.max():.3f}]",
            f"  dead dims: {len(s.dead_dims)} ({s.dead_share:.1%}); outlier dims: "
            f"{len(s.outlier_dims)} ({s.outlier_share:.1%}){': ' + outliers if outliers else ''}",
            f"  norm by position: first {pos[0]:.3f}, middle mean {middle:.3f}, last {pos[-1]:.3f}",
        ]
    )


def format_matrix(labels: list[str], values: np.ndarray) -> str:
    width = max(10, *(len(x) + 2 for x in labels))
    lines = [" " * width + "".join(f"{x:>{width}}" for x in labels)]
    for label, row in zip(labels, values):
        cells = "".join(f"{'-':>{width}}" if np.isnan(v) else f"{v:>{width}.4f}" for v in row)
        lines.append(f"{label:<{width}}{cells}")
    return "\n".join(lines)


def format_similarity(sim: Similarity) -> str:
    return "\n".join(
        [
            f"similarity over {sim.rows:,} rows, {sim.tokens:,} tokens",
            "linear CKA:",
            format_matrix(sim.labels, sim.cka),
            "mean per-token cosine:",
            format_matrix(sim.labels, sim.cosine_mean),
        ]
    )


def format_report(report: Report, max_tokens: int = 24) -> str:
    parts = []
    if report.stages:
        modes = ", ".join(
            f"stage-{e.stage} {e.mode}"
            + (f" ({e.num_layers} layers, {e.frozen_layers} frozen)" if e.num_layers else "")
            for e in report.stages
        )
        parts.append(f"run {report.run_dir}: {modes}")
    parts += [format_summary(label, s) for label, s in report.stores.items()]
    if report.stats:
        parts.append("statistics")
        parts += [format_stats(label, s) for label, s in report.stats.items()]
    if report.similarity is not None:
        parts.append(format_similarity(report.similarity))
    if report.row is not None:
        r = report.row
        parts.append(
            f"row {r.row} (prepared example {r.row_index}), masked positions as "
            f"[[original->input]]:\n{r.text()}\n\n{r.table(max_tokens)}"
        )
    if report.neighbours:
        lines = [
            f"rows nearest to row {report.row.row if report.row else '?'} (cosine of mean-pooled vectors, centred):"
        ]
        for n, text in report.neighbours:
            lines.append(
                f"  row {n.row:>6} (example {n.row_index:>6})  cos {n.cosine:.4f}  {text[:90]}"
            )
        parts.append("\n".join(lines))
    if report.probe:
        from cached_mslt.inspect.probe import format_probe

        parts.append(
            "BBC topic probe (logistic regression on mean-pooled hidden states):\n"
            + format_probe(report.probe)
            + f"\nmajority-class test accuracy: {report.probe_majority:.3f}"
        )
    if report.plots:
        parts.append("plots: " + ", ".join(report.plots))
    parts += [f"note: {n}" for n in report.notes]
    return "\n\n".join(parts)
