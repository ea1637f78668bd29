"""Streaming statistics of a store's hidden states, one chunk-aligned block at a time.

Memory is O(H + T + histogram bins) whatever the store's size; only real tokens count
(attention mask 1: padding is not data). What is computed: per-dimension mean, std and
RMS; the token-norm distribution (a fixed log-spaced histogram, so blocks merge exactly);
the share of dead dimensions (nearly constant) and outlier dimensions (magnitude far
above the rest, as in BERT); the mean token norm at each position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cached_mslt.inspect.api import block_ranges, iter_blocks, single_threaded_compute
from storage import ActivationStore

# The token-norm distribution is kept as a uniform random sample of this many tokens
# (exact below it): fixed histogram bins cannot resolve both a barely trained model's
# norms, which all sit within 0.1% of sqrt(H), and a trained one's spread over decades.
NORM_SAMPLE = 1 << 16
PIECE_BYTES = 1 << 20  # float32 work per piece: stays in cache across the passes
DEAD_REL_STD = 1e-3  # dead: std below this fraction of the median dimension's std
OUTLIER_SIGMAS = 3.0  # outlier: RMS beyond mean + 3 sigma over dims (Kovaleva et al. 2021)


def real_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[rows, T, H] -> [tokens, H] float32 of the real tokens. Packed data has no padding:
    then this is a view plus the dtype conversion, no gather."""
    x = hidden.float() if hidden.dtype != torch.float32 else hidden
    if bool(mask.all()):
        return x.reshape(-1, x.shape[-1])
    return x[mask.bool()]


@dataclass
class HiddenStats:
    """What `hidden_stats` found; arrays are numpy, JSON via `to_dict`."""

    rows: int
    tokens: int
    mean: np.ndarray  # [H] per-dimension mean over tokens
    std: np.ndarray  # [H] population std
    rms: np.ndarray  # [H] sqrt(mean of squares): the dimension's magnitude
    norm_sample: np.ndarray  # a uniform sample of token norms (all of them if few)
    norm_min: float
    norm_max: float
    norm_mean: float
    position_norm: np.ndarray  # [T] mean token norm per position (NaN if no tokens there)
    position_tokens: np.ndarray  # [T]
    dead_dims: list[int] = field(default_factory=list)
    outlier_dims: list[int] = field(default_factory=list)

    @property
    def dead_share(self) -> float:
        return len(self.dead_dims) / len(self.mean)

    @property
    def outlier_share(self) -> float:
        return len(self.outlier_dims) / len(self.mean)

    def norm_quantiles(self, qs: tuple[float, ...] = (0.01, 0.5, 0.99)) -> dict[str, float]:
        """Quantiles of the token norm (exact when the store has <= NORM_SAMPLE tokens)."""
        values = np.quantile(self.norm_sample, qs)
        return {f"p{round(q * 100):02d}": float(v) for q, v in zip(qs, values)}

    def to_dict(self, arrays: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "rows": self.rows,
            "tokens": self.tokens,
            "norm": {
                "mean": self.norm_mean,
                "min": self.norm_min,
                "max": self.norm_max,
                **self.norm_quantiles(),
            },
            "dead_dims": self.dead_dims,
            "dead_share": self.dead_share,
            "outlier_dims": self.outlier_dims,
            "outlier_share": self.outlier_share,
            "std_median": float(np.median(self.std)),
        }
        if arrays:
            d |= {
                "mean": self.mean.tolist(),
                "std": self.std.tolist(),
                "rms": self.rms.tolist(),
                "norm_percentiles": np.quantile(self.norm_sample, np.linspace(0, 1, 101)).tolist(),
                "position_norm": [None if np.isnan(v) else float(v) for v in self.position_norm],
            }
        return d


class StatsAccumulator:
    """Feed blocks with `update(hidden, attention_mask)`, read the result with `result()`.

    Moments use the shifted-data algorithm: every token is shifted by a fixed vector (the
    mean of the first ~1 MiB of tokens), and float32 sums of the shifted values and their squares over a
    piece of ~1 MiB are added into float64 totals. With the shift close to the mean the
    final `E[y^2] - E[y]^2` does not cancel (BERT's outlier dimensions have means far
    above their spread), and pieces that fit in the CPU cache make the several passes
    per piece nearly free next to reading the store.
    """

    def __init__(self, seq_len: int, hidden_size: int):
        self.rows = 0
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.sum = np.zeros(hidden_size)  # of (x - shift)
        self.sum_sq = np.zeros(hidden_size)  # of (x - shift)^2
        # Sample = the NORM_SAMPLE tokens with the smallest random keys seen so far: uniform
        # without replacement, merged block by block, reproducible through the seed.
        self.generator = torch.Generator().manual_seed(0)
        self.sample_keys, self.sample = torch.empty(0), torch.empty(0)
        self.norm_sum = 0.0
        self.norm_min, self.norm_max = np.inf, -np.inf
        self.position_sum = np.zeros(seq_len)
        self.position_tokens = np.zeros(seq_len, dtype=np.int64)
        self.piece = max(1, PIECE_BYTES // (4 * hidden_size))  # tokens per piece

    def update(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.rows += hidden.shape[0]
        mask = attention_mask.bool()
        x = hidden.reshape(-1, hidden.shape[-1]) if bool(mask.all()) else hidden[mask]
        if not len(x):
            return
        if self.shift is None:
            self.shift = x[: self.piece].float().mean(0)
        norms = torch.cat(
            [self._moments(x[a : a + self.piece]) for a in range(0, len(x), self.piece)]
        )
        self.n += len(x)
        self._norms(norms, mask)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        """Add one piece's shifted sums; return its token norms."""
        # Cast first: a mixed-dtype subtraction takes torch's slow casting path (10x here).
        y = x.float() - self.shift
        # ||x||^2 = ||y||^2 + 2 y.s + ||s||^2, so the norms reuse the shifted squares.
        cross = y @ self.shift
        self.sum += y.sum(0).double().numpy()
        y.square_()
        self.sum_sq += y.sum(0).double().numpy()
        norm_sq = y.sum(1) + 2 * cross + self.shift.square().sum()
        return norm_sq.clamp_min_(0).sqrt_()

    def _norms(self, norms: torch.Tensor, mask: torch.Tensor) -> None:
        self.norm_sum += float(norms.double().sum())
        self.norm_min = min(self.norm_min, float(norms.min()))
        self.norm_max = max(self.norm_max, float(norms.max()))
        keys = torch.cat([self.sample_keys, torch.rand(len(norms), generator=self.generator)])
        values = torch.cat([self.sample, norms])
        if len(keys) > NORM_SAMPLE:
            keep = torch.topk(keys, NORM_SAMPLE, largest=False).indices
            keys, values = keys[keep], values[keep]
        self.sample_keys, self.sample = keys, values
        if len(norms) == mask.numel():  # no padding: a view, no scatter
            per_position = norms.double().view(mask.shape)
        else:
            per_position = torch.zeros(mask.shape, dtype=torch.float64)
            per_position[mask] = norms.double()
        self.position_sum += per_position.sum(0).numpy()
        self.position_tokens += mask.sum(0).numpy()

    def result(self) -> HiddenStats:
        if self.n == 0:
            raise ValueError("no real tokens were read: the sample is empty or fully padded")
        shifted_mean = self.sum / self.n
        mean = self.shift.double().numpy() + shifted_mean
        var = np.maximum(self.sum_sq / self.n - shifted_mean**2, 0.0)
        std = np.sqrt(var)
        rms = np.sqrt(var + mean**2)
        dead = np.flatnonzero(std <= DEAD_REL_STD * np.median(std))
        outliers = np.flatnonzero(rms > rms.mean() + OUTLIER_SIGMAS * rms.std())
        with np.errstate(invalid="ignore", divide="ignore"):
            position_norm = self.position_sum / self.position_tokens
        return HiddenStats(
            rows=self.rows,
            tokens=self.n,
            mean=mean,
            std=std,
            rms=rms,
            norm_sample=self.sample.double().numpy(),
            norm_min=self.norm_min,
            norm_max=self.norm_max,
            norm_mean=self.norm_sum / self.n,
            position_norm=position_norm,
            position_tokens=self.position_tokens.copy(),
            dead_dims=dead.tolist(),
            outlier_dims=outliers.tolist(),
        )


def hidden_stats(
    store: ActivationStore, rows: int | None = None, *, prefetch: bool = True
) -> HiddenStats:
    """Statistics over the whole store (rows=None) or a chunk-aligned sample of ~`rows`."""
    acc = StatsAccumulator(store.spec.seq_len, store.spec.hidden_size)
    with single_threaded_compute():
        for block in iter_blocks(store, block_ranges(store, rows), prefetch=prefetch):
            acc.update(block["hidden"], block["attention_mask"])
    return acc.result()
