"""Deterministic stand-in activations for tests and benchmarks.

Row i depends only on (seed, i), never on which process or shard produced it, so any
process can regenerate exactly what another one wrote.
"""

from __future__ import annotations

import numpy as np
import torch

from storage.spec import StoreSpec
from storage.store import ActivationStore

VOCAB_SIZE = 30522  # bert-base-uncased; only used to make plausible label ids
ROW_INDEX_OFFSET = 1_000_000  # row_index != row, so a mixed-up row order cannot pass a test


def synthetic_rows(
    spec: StoreSpec, start: int, stop: int, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Rows [start, stop) of a fake store: normal hidden states in the store's dtype, a
    padded attention mask, ~15% labelled positions, and row_index = offset + row."""
    t, h = spec.seq_len, spec.hidden_size
    rows = np.arange(start, stop)
    hidden = np.stack(
        [
            np.random.default_rng([seed, int(i)]).standard_normal((t, h), dtype=np.float32)
            for i in rows
        ]
    )
    lengths = t - (rows * 7) % (t // 2 + 1)
    positions = np.arange(t)
    mask = positions[None, :] < lengths[:, None]
    picked = ((rows[:, None] * 13 + positions[None, :] * 7 + seed) % 100 < 15) & mask
    labels = np.where(picked, (rows[:, None] * 31 + positions[None, :]) % VOCAB_SIZE, -100)
    return {
        "hidden": torch.from_numpy(hidden).reshape(len(rows), t, h).to(spec.torch_dtype),
        "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        "labels": torch.from_numpy(labels.astype(np.int64)),
        "row_index": torch.from_numpy(rows.astype(np.int64) + ROW_INDEX_OFFSET),
    }


def write_synthetic_shards(store: ActivationStore, shards: list[int], *, seed: int = 0) -> None:
    """Write the given shards of `store` with `synthetic_rows`."""
    for shard in shards:
        start, stop = store.shard_rows(shard)
        store.write_shard(shard, **synthetic_rows(store.spec, start, stop, seed=seed))


def build_synthetic_store(
    url: str,
    spec: StoreSpec,
    *,
    fingerprint: dict[str, str],
    seed: int = 0,
    commit: bool = True,
    storage_options: dict | None = None,
) -> ActivationStore:
    """Create a store at `url`, write every shard with `synthetic_rows`, and commit."""
    store = ActivationStore.create(
        url, spec, fingerprint=fingerprint, storage_options=storage_options
    )
    write_synthetic_shards(store, list(range(store.num_shards)), seed=seed)
    if commit:
        store.commit()
    return store
