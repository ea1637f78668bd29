"""Linear probe: what each stage's frozen bottom encodes about BBC news topics.

Each BBC article (docs/evaluation.md; read, deduplicated and split by `cached_mslt.evaluation.tasks`) is
tokenized to 128 tokens and run through the frozen bottom of every stage; a multinomial
logistic regression on the mean-pooled hidden states predicts its topic. Probe accuracy
per stage is a quick read of how much topic information the frozen layers already carry.

In MSLT the frozen layers never change, so stage K's bottom is the first F_K layers of
the final checkpoint. One forward through that checkpoint serves every stage, but only
where those layers hash to the fingerprint stage K recorded; otherwise stage K's own
checkpoint is run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import BertForMaskedLM

from cached_mslt.data import load_tokenizer
from cached_mslt.evaluation import DEFAULT_TASK_DIR, fit_probe, prepare_task
from cached_mslt.models import bottom_fingerprint, layer_mask, mean_pool
from cached_mslt.rundir import RunLayout

SEQ_LEN = 128
BATCH_ROWS = 64


@dataclass
class ProbeResult:
    name: str  # "embeddings", "stage-K bottom" or "final model"
    layers: int  # encoder layers below the probe
    valid_accuracy: float
    test_accuracy: float
    l2: float
    source: str  # which checkpoint produced the features


@dataclass
class Encoded:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def encode_split(texts: list[str], labels: list[int], tokenizer, seq_len: int) -> Encoded:
    enc = tokenizer(
        texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt"
    )
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor(labels))


@torch.no_grad()
def pooled_features(
    model: BertForMaskedLM, data: Encoded, depths: list[int]
) -> dict[int, torch.Tensor]:
    """Mean-pooled hidden states after each of `depths` encoder layers (0 = embeddings),
    from one forward pass per batch."""
    model.eval()
    out: dict[int, list[torch.Tensor]] = {d: [] for d in depths}
    for a in range(0, len(data.labels), BATCH_ROWS):
        ids, mask = data.input_ids[a : a + BATCH_ROWS], data.attention_mask[a : a + BATCH_ROWS]
        hidden = model.bert.embeddings(input_ids=ids)
        layer_in = layer_mask(model, hidden, mask)
        for depth in range(max(depths) + 1):
            if depth:
                hidden = model.bert.encoder.layer[depth - 1](hidden, layer_in)
            if depth in out:
                out[depth].append(mean_pool(hidden, mask))
    return {d: torch.cat(v) for d, v in out.items()}


def _subsample(ds, max_examples: int | None) -> tuple[list[str], list[int]]:
    """Texts and labels of a split, or a seeded random subset: splits are stored in
    source order, i.e. grouped by topic, so their head would hold one or two topics."""
    index = np.arange(len(ds))
    if max_examples is not None and max_examples < len(ds):
        index = np.sort(np.random.default_rng(0).permutation(len(ds))[:max_examples])
    rows = ds.select(index)
    return list(rows["text"]), list(rows["label"])


def _stage_bottoms(run: RunLayout) -> list[tuple[int, int, str, Path]]:
    """(stage, frozen layers, recorded bottom fingerprint, checkpoint) of finished stages."""
    return [
        (
            m["stage"]["index"],
            m["stage"]["frozen_layers"],
            m["fingerprints"]["frozen_bottom"],
            run.model_dir(m["stage"]["index"]),
        )
        for m in run.stages()
    ]


def probe_run(
    run_dir: str | Path,
    *,
    task_dir: str | Path = DEFAULT_TASK_DIR,
    seq_len: int = SEQ_LEN,
    max_examples: int | None = None,
) -> list[ProbeResult]:
    """Probe accuracy for the embeddings, every stage's frozen bottom and the final model."""
    run = RunLayout(run_dir)
    stages = _stage_bottoms(run)
    if not stages:
        raise FileNotFoundError(f"{run.root} has no finished stage (no stage-K/manifest.json)")
    final_ckpt = stages[-1][3]
    task = prepare_task("bbc", task_dir, verbose=False)
    tokenizer = load_tokenizer(str(final_ckpt))
    data = {
        split: encode_split(*_subsample(ds, max_examples), tokenizer, seq_len)
        for split, ds in task.splits.items()
    }
    labels = {k: v.labels for k, v in data.items()}

    def features(model: BertForMaskedLM, depths: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        per_split = {k: pooled_features(model, v, depths) for k, v in data.items()}
        return {d: {k: per_split[k][d] for k in data} for d in depths}

    final = BertForMaskedLM.from_pretrained(final_ckpt)
    depth = final.config.num_hidden_layers
    shared, own = [], []
    for stage, frozen, fp, ckpt in stages:
        if frozen == 0:
            continue
        bottom = bottom_fingerprint(final, frozen)
        (shared if bottom == fp else own).append((stage, frozen, ckpt))
    feats = features(final, sorted({0, depth, *(f for _, f, _ in shared)}))

    def result(name: str, layers: int, x: dict[str, torch.Tensor], source: Path) -> ProbeResult:
        fit = fit_probe(x, labels, task.num_labels)
        return ProbeResult(name, layers, fit.valid_accuracy, fit.test_accuracy, fit.l2, str(source))

    results = [result("embeddings", 0, feats[0], final_ckpt)]
    for stage, frozen, _ in shared:
        results.append(result(f"stage-{stage} bottom", frozen, feats[frozen], final_ckpt))
    for stage, frozen, ckpt in own:
        x = features(BertForMaskedLM.from_pretrained(ckpt), [frozen])[frozen]
        results.append(result(f"stage-{stage} bottom", frozen, x, ckpt))
    results.append(result("final model", depth, feats[depth], final_ckpt))
    return sorted(results, key=lambda r: (r.layers, r.name))


def majority_accuracy(task_dir: str | Path = DEFAULT_TASK_DIR) -> float:
    """Test accuracy of always predicting the most frequent training topic."""
    task = prepare_task("bbc", task_dir, verbose=False)
    train = torch.tensor(list(task.splits["train"]["label"]))
    test = torch.tensor(list(task.splits["test"]["label"]))
    return float((test == torch.bincount(train).argmax()).double().mean())


def format_probe(results: list[ProbeResult]) -> str:
    lines = [f"{'features':<20}{'layers':>7}{'valid acc':>11}{'test acc':>10}{'l2':>8}"]
    for r in results:
        lines.append(
            f"{r.name:<20}{r.layers:>7}{r.valid_accuracy:>11.3f}{r.test_accuracy:>10.3f}{r.l2:>8g}"
        )
    return "\n".join(lines)
