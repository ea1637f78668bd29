"""Stores with chosen contents for the inspect tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from storage import ActivationStore, StoreSpec
from storage.synthetic import synthetic_rows


def write_store(
    url: Path | str,
    spec: StoreSpec,
    hidden: np.ndarray | torch.Tensor | None = None,
    *,
    fingerprint: dict[str, str] | None = None,
    attrs: dict | None = None,
    shards: list[int] | None = None,
    commit: bool = True,
    **arrays: np.ndarray | torch.Tensor,
) -> ActivationStore:
    """A store whose rows are `synthetic_rows` except for the arrays given (whole-store
    arrays, cut per shard); only `shards` are written (all by default)."""
    store = ActivationStore.create(url, spec, fingerprint=fingerprint or {"test": "1"}, attrs=attrs)
    full = synthetic_rows(spec, 0, spec.num_rows)
    if hidden is not None:
        full["hidden"] = torch.as_tensor(hidden).to(spec.torch_dtype)
    full |= {k: torch.as_tensor(v) for k, v in arrays.items()}
    for shard in range(store.num_shards) if shards is None else shards:
        a, b = store.shard_rows(shard)
        store.write_shard(shard, **{k: v[a:b] for k, v in full.items()})
    if commit:
        store.commit()
    return ActivationStore.open(url, require_complete=commit)


def as_float64(hidden: torch.Tensor) -> np.ndarray:
    return hidden.to(torch.float64).numpy()
