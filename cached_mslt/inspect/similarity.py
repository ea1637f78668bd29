"""Stage-to-stage similarity of hidden states: linear CKA and per-token cosine, streamed.

Several stores of one run hold the same rows (same prepared examples, same order), so
they are read in lockstep, block by block. Linear CKA (Kornblith et al. 2019) over
tokens is

    CKA(X, Y) = ||C_yx||_F^2 / (||C_xx||_F ||C_yy||_F),  C_yx = Yc^T Xc (centred over tokens),

which needs only H x H sums: every pair's cross-product matrix is accumulated in float64
from float32 block products. Each store's data is shifted by its first block's mean
before the products (the covariance does not change), so removing the mean at the end
does not cancel large numbers against each other (BERT's outlier dimensions have means
far above their spread).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cached_mslt.inspect.api import block_ranges, iter_blocks, single_threaded_compute
from cached_mslt.inspect.stats import real_tokens
from storage import ActivationStore

COSINE_BINS = 200  # over [-1, 1]


class StoresDisagreeError(ValueError):
    """The stores do not hold the same rows, so their hidden states cannot be paired."""


@dataclass
class Similarity:
    """Pairwise similarity of K stores' hidden states over the same tokens."""

    labels: list[str]
    rows: int
    tokens: int
    cka: np.ndarray  # [K, K] linear CKA, 1 on the diagonal
    cosine_mean: np.ndarray  # [K, K] mean per-token cosine; NaN where hidden sizes differ
    cosine_counts: dict[tuple[int, int], np.ndarray]  # histogram on COSINE_BINS over [-1, 1]
    cosine_by_position: dict[tuple[int, int], np.ndarray]  # [T] mean cosine per position

    def to_dict(self, arrays: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "labels": self.labels,
            "rows": self.rows,
            "tokens": self.tokens,
            "cka": self.cka.round(6).tolist(),
            "cosine_mean": [
                [None if np.isnan(v) else round(float(v), 6) for v in r] for r in self.cosine_mean
            ],
        }
        if arrays:
            d["cosine_by_position"] = {
                f"{self.labels[i]}|{self.labels[j]}": v.tolist()
                for (i, j), v in self.cosine_by_position.items()
            }
            d["cosine_histogram"] = {
                "edges": np.linspace(-1, 1, COSINE_BINS + 1).tolist(),
                **{
                    f"{self.labels[i]}|{self.labels[j]}": c.tolist()
                    for (i, j), c in self.cosine_counts.items()
                },
            }
        return d


def linear_cka(cross: np.ndarray, gram_x: np.ndarray, gram_y: np.ndarray) -> float:
    """CKA from centred covariance-type matrices C_yx, C_xx, C_yy (any common scale)."""
    denom = np.linalg.norm(gram_x) * np.linalg.norm(gram_y)
    return float(np.linalg.norm(cross) ** 2 / denom) if denom > 0 else float("nan")


class SimilarityAccumulator:
    """Lockstep blocks of K stores in, `Similarity` out."""

    def __init__(self, hidden_sizes: list[int], seq_len: int):
        self.k = len(hidden_sizes)
        self.rows = self.n = 0
        self.shift: list[torch.Tensor] | None = None
        self.sums = [np.zeros(h) for h in hidden_sizes]
        # products[i, j] = sum over tokens of x_i^T x_j (shifted), for i <= j
        self.products = {
            (i, j): np.zeros((hidden_sizes[i], hidden_sizes[j]))
            for i in range(self.k)
            for j in range(i, self.k)
        }
        self.cos_pairs = [
            (i, j) for (i, j) in self.products if i < j and hidden_sizes[i] == hidden_sizes[j]
        ]
        self.cos_sum = {p: 0.0 for p in self.cos_pairs}
        self.cos_counts = {p: np.zeros(COSINE_BINS, dtype=np.int64) for p in self.cos_pairs}
        self.cos_position = {p: np.zeros(seq_len) for p in self.cos_pairs}
        self.position_tokens = np.zeros(seq_len, dtype=np.int64)

    def update(self, blocks: list[dict[str, torch.Tensor]]) -> None:
        first = blocks[0]
        for b in blocks[1:]:
            if not torch.equal(b["row_index"], first["row_index"]) or not torch.equal(
                b["attention_mask"], first["attention_mask"]
            ):
                raise StoresDisagreeError(
                    f"rows {int(first['row_index'][0])}...: the stores hold different examples "
                    "(row_index or attention mask differ); only stores built from the same "
                    "prepared rows (stages of one run) can be compared token by token"
                )
        mask = first["attention_mask"].bool()
        xs = [real_tokens(b["hidden"], first["attention_mask"]) for b in blocks]
        self.rows += len(mask)
        if not len(xs[0]):
            return
        self._cosines(xs, mask)
        if self.shift is None:
            self.shift = [x.mean(0) for x in xs]
        xs = [x - s for x, s in zip(xs, self.shift)]
        self.n += len(xs[0])
        for i, x in enumerate(xs):
            self.sums[i] += x.sum(0).double().numpy()
        for i, j in self.products:
            self.products[i, j] += (xs[i].T @ xs[j]).double().numpy()

    def _cosines(self, xs: list[torch.Tensor], mask: torch.Tensor) -> None:
        self.position_tokens += mask.sum(0).numpy()
        for i, j in self.cos_pairs:
            cos = torch.nn.functional.cosine_similarity(xs[i], xs[j], dim=-1)
            self.cos_sum[i, j] += float(cos.double().sum())
            self.cos_counts[i, j] += torch.histc(cos, COSINE_BINS, -1.0, 1.0).long().numpy()
            per_position = torch.zeros(mask.shape, dtype=torch.float64)
            per_position[mask] = cos.double()
            self.cos_position[i, j] += per_position.sum(0).numpy()

    def _centred(self, i: int, j: int) -> np.ndarray:
        return self.products[i, j] - np.outer(self.sums[i], self.sums[j]) / self.n

    def result(self, labels: list[str]) -> Similarity:
        if self.n == 0:
            raise ValueError("no real tokens were read: the sample is empty or fully padded")
        cka = np.eye(self.k)
        cos = np.full((self.k, self.k), np.nan)
        grams = [self._centred(i, i) for i in range(self.k)]
        for i, j in self.products:
            if i < j:
                cka[i, j] = cka[j, i] = linear_cka(self._centred(i, j), grams[i], grams[j])
        for p in self.cos_pairs:
            cos[p] = cos[p[::-1]] = self.cos_sum[p] / self.n
        np.fill_diagonal(cos, 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            by_position = {p: v / self.position_tokens for p, v in self.cos_position.items()}
        return Similarity(labels, self.rows, self.n, cka, cos, dict(self.cos_counts), by_position)


def similarity(
    stores: list[ActivationStore], rows: int | None = None, labels: list[str] | None = None
) -> Similarity:
    """CKA and cosine between every pair of `stores` over the same rows (all, or a
    chunk-aligned sample of ~`rows`), reading all stores in lockstep in one pass."""
    ref = stores[0].spec
    for s in stores[1:]:
        if (s.spec.num_rows, s.spec.seq_len) != (ref.num_rows, ref.seq_len):
            raise StoresDisagreeError(
                f"{s.url} holds {s.spec.num_rows} rows of {s.spec.seq_len} tokens, {stores[0].url} "
                f"{ref.num_rows} of {ref.seq_len}: only stores of the same rows can be compared"
            )
    # Lockstep blocks must be whole chunks of every store.
    rpc = math.lcm(*(s.rows_per_chunk for s in stores))
    ranges = block_ranges(stores[0], rows, rows_per_chunk=rpc)
    acc = SimilarityAccumulator([s.spec.hidden_size for s in stores], ref.seq_len)
    with single_threaded_compute():
        for blocks in zip(*(iter_blocks(s, ranges) for s in stores)):
            acc.update(list(blocks))
    return acc.result(labels or [s.url for s in stores])
