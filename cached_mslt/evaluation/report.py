"""Scores and tables of evaluation results."""

from __future__ import annotations

from typing import Any

import numpy as np

from cached_mslt.training import markdown_table


def classification_metrics(
    preds: np.ndarray, labels: np.ndarray, num_labels: int
) -> dict[str, float]:
    """Accuracy and macro-F1 (mean over classes that occur in labels or predictions, as sklearn)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    confusion = np.bincount(labels * num_labels + preds, minlength=num_labels**2).reshape(
        num_labels, num_labels
    )
    true_pos = np.diag(confusion)
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (#predicted + #actual), per class.
    support = confusion.sum(0) + confusion.sum(1)
    f1 = 2 * true_pos[support > 0] / support[support > 0]
    return {"accuracy": float(true_pos.sum() / len(labels)), "macro_f1": float(f1.mean())}


def mean_std(values: list[float]) -> tuple[float, float]:
    # Sample std (ddof=1): the seeds are a sample of the runs one could have made.
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def format_results(results: list[dict[str, Any]]) -> str:
    """A Markdown table of `finetune` results: accuracy and macro-F1 as mean +/- std in %."""
    lines = [
        "| task | test examples | seeds | accuracy (%) | macro-F1 (%) | majority class (%) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        acc = f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f}"
        f1 = f"{100 * r['macro_f1_mean']:.1f} ± {100 * r['macro_f1_std']:.1f}"
        lines.append(
            f"| {r['task']} | {r['sizes']['test']:,} | {len(r['runs'])} | {acc} | {f1} "
            f"| {100 * r['majority_accuracy']:.1f} |"
        )
    return "\n".join(lines)


def format_probes(results: list[dict[str, Any]]) -> str:
    """A Markdown table of `linear_probe` results, in %."""
    rows = [
        {
            "task": r["task"],
            "linear probe accuracy (%)": f"{100 * r['test_accuracy']:.1f}",
            "macro-F1 (%)": f"{100 * r['test_macro_f1']:.1f}",
            "majority class (%)": f"{100 * r['majority_accuracy']:.1f}",
            "L2": f"{r['l2']:g}",
        }
        for r in results
    ]
    return markdown_table(rows, list(rows[0]) if rows else [])
