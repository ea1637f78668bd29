"""PNG figures of the inspect results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from cached_mslt.inspect.similarity import COSINE_BINS, Similarity  # noqa: E402
from cached_mslt.inspect.stats import HiddenStats  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def norm_histograms(stats: dict[str, HiddenStats], path: Path) -> Path:
    """Token-norm distribution per store (from each one's uniform sample of tokens)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, s in stats.items():
        ax.hist(s.norm_sample, bins=100, histtype="step", density=True, label=label)
    ax.set(xlabel="token norm ||h||", ylabel="density", title="Token-norm distribution")
    ax.legend()
    return _save(fig, path)


def position_norms(stats: dict[str, HiddenStats], path: Path) -> Path:
    """Mean token norm at each position: [CLS], [SEP] and early positions often stand out."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, s in stats.items():
        ax.plot(np.arange(len(s.position_norm)), s.position_norm, label=label)
    ax.set(xlabel="position", ylabel="mean token norm", title="Token norm by position")
    ax.legend()
    return _save(fig, path)


def dimension_spread(stats: dict[str, HiddenStats], path: Path) -> Path:
    """Per-dimension std and |mean|, dimensions sorted by RMS: outliers sit on the right."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for label, s in stats.items():
        order = np.argsort(s.rms)
        axes[0].plot(s.std[order], label=label)
        axes[1].plot(np.abs(s.mean[order]), label=label)
    axes[0].set(xlabel="dimension (sorted by RMS)", ylabel="std", yscale="log", title="Std")
    axes[1].set(xlabel="dimension (sorted by RMS)", ylabel="|mean|", yscale="log", title="|Mean|")
    axes[0].legend()
    return _save(fig, path)


def similarity_matrices(sim: Similarity, path: Path) -> Path:
    """Linear CKA and mean per-token cosine between every pair of stores."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, values, title in (
        (axes[0], sim.cka, "linear CKA"),
        (axes[1], sim.cosine_mean, "mean cosine"),
    ):
        im = ax.imshow(values, vmin=0 if title == "linear CKA" else -1, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(sim.labels)), sim.labels, rotation=45, ha="right")
        ax.set_yticks(range(len(sim.labels)), sim.labels)
        for (i, j), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)


def cosine_histograms(sim: Similarity, path: Path) -> Path:
    """Distribution of per-token cosine for each pair of stores with equal hidden size."""
    fig, ax = plt.subplots(figsize=(7, 4))
    edges = np.linspace(-1, 1, COSINE_BINS + 1)
    for (i, j), counts in sim.cosine_counts.items():
        ax.stairs(counts / max(counts.sum(), 1), edges, label=f"{sim.labels[i]} vs {sim.labels[j]}")
    ax.set(xlabel="cosine(h_a, h_b) per token", ylabel="share of tokens", title="Per-token cosine")
    ax.legend(fontsize="small")
    return _save(fig, path)


def write_plots(
    directory: str | Path, stats: dict[str, HiddenStats], sim: Similarity | None
) -> list[Path]:
    """Every figure the results allow, into `directory`; returns the files written."""
    out = Path(directory)
    written = []
    if stats:
        written += [
            norm_histograms(stats, out / "norm_histogram.png"),
            position_norms(stats, out / "position_norms.png"),
            dimension_spread(stats, out / "dimension_spread.png"),
        ]
    if sim is not None:
        written.append(similarity_matrices(sim, out / "similarity.png"))
        if sim.cosine_counts:
            written.append(cosine_histograms(sim, out / "cosine_histogram.png"))
    return written
