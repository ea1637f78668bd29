"""Linear CKA and per-token cosine between stores, streamed, against their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from cached_mslt.inspect import similarity
from cached_mslt.inspect.similarity import StoresDisagreeError
from storage import ActivationStore, StoreSpec
from tests.inspect_support import as_float64, write_store

# 2,048 real tokens of 16 dims (no padding): enough that independent data has CKA near 0.
SPEC = StoreSpec(
    num_rows=64, seq_len=32, hidden_size=16, dtype="float32", rows_per_chunk=8, chunks_per_shard=2
)
FULL_MASK = np.ones((64, 32), dtype=np.int64)


def data(seed: int, offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # correlated dims with unequal scales, plus an offset: CKA must centre it away
    mix = rng.standard_normal((16, 16)) * np.linspace(0.2, 3, 16)
    return (rng.standard_normal((64, 32, 16)) @ mix + offset).astype(np.float32)


def make(tmp_path, name: str, hidden: np.ndarray, **kw) -> ActivationStore:
    return write_store(tmp_path / name, SPEC, hidden, attention_mask=FULL_MASK, **kw)


def numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def tokens(store: ActivationStore) -> np.ndarray:
    return as_float64(store.read_rows(0, SPEC.num_rows)["hidden"]).reshape(-1, 16)


def test_cka_of_a_store_with_itself_is_one(tmp_path):
    a = make(tmp_path, "a", data(0, offset=50.0))
    copy = make(tmp_path, "copy", data(0, offset=50.0))
    sim = similarity([a, a, copy])
    np.testing.assert_allclose(sim.cka, np.ones((3, 3)), atol=1e-6)
    np.testing.assert_allclose(sim.cosine_mean, np.ones((3, 3)), atol=1e-6)


def test_cka_is_invariant_to_an_orthogonal_rotation(tmp_path):
    hidden = data(0, offset=5.0)
    q, _ = np.linalg.qr(np.random.default_rng(7).standard_normal((16, 16)))
    a, rotated = make(tmp_path, "a", hidden), make(tmp_path, "r", hidden @ q.astype(np.float32))
    sim = similarity([a, rotated])
    assert sim.cka[0, 1] == pytest.approx(1.0, abs=1e-5)
    assert sim.cosine_mean[0, 1] < 0.9  # the vectors did move: cosine sees it, CKA does not


def test_cka_of_independent_noise_is_near_zero(tmp_path):
    a, noise = make(tmp_path, "a", data(0)), make(tmp_path, "n", data(1))
    sim = similarity([a, noise])
    assert sim.cka[0, 1] < 0.05
    assert sim.cka[0, 1] == pytest.approx(numpy_cka(tokens(a), tokens(noise)), rel=1e-6)


def test_cka_and_cosine_match_numpy_on_partly_related_stores(tmp_path):
    hidden = data(0, offset=3.0)
    a = make(tmp_path, "a", hidden)
    b = make(tmp_path, "b", hidden + 2.0 * data(1))  # related, far from identical
    sim = similarity([a, b], labels=["a", "b"])
    x, y = tokens(a), tokens(b)
    assert 0.1 < sim.cka[0, 1] < 0.9
    assert sim.cka[0, 1] == pytest.approx(numpy_cka(x, y), rel=1e-6)
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    assert sim.cosine_mean[0, 1] == pytest.approx(cos.mean(), rel=1e-5)
    np.testing.assert_allclose(sim.cosine_by_position[0, 1], cos.reshape(64, 32).mean(0), rtol=1e-5)
    assert sim.tokens == 64 * 32 and sim.labels == ["a", "b"]


def test_padding_is_left_out_of_the_comparison(tmp_path):
    """Synthetic rows are padded: only real tokens enter CKA and cosine."""
    spec = StoreSpec(num_rows=16, seq_len=8, hidden_size=4, dtype="float32", rows_per_chunk=4)
    a = write_store(tmp_path / "a", spec)
    b = write_store(tmp_path / "b", spec, a.read_rows(0, 16)["hidden"] * -1.0)
    mask = a.read_rows(0, 16)["attention_mask"].numpy().astype(bool)
    sim = similarity([a, b])
    assert sim.tokens == mask.sum() < mask.size
    assert sim.cosine_mean[0, 1] == pytest.approx(-1.0, abs=1e-6)
    assert sim.cka[0, 1] == pytest.approx(1.0, abs=1e-6)


def test_stores_of_different_rows_are_refused(tmp_path):
    a = make(tmp_path, "a", data(0))
    shuffled = make(tmp_path, "s", data(0), row_index=np.arange(64)[::-1].copy())
    with pytest.raises(StoresDisagreeError, match="different examples"):
        similarity([a, shuffled])
