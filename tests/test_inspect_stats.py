"""Streaming statistics and the store summary equal numpy on the same arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cached_mslt.inspect import block_ranges, hidden_stats, summarize_store
from cached_mslt.inspect.stats import DEAD_REL_STD, OUTLIER_SIGMAS
from storage import StoreSpec
from tests.inspect_support import as_float64, write_store

# 5 shards of 8 rows (the last short), 4 rows per chunk; synthetic rows are padded.
SPEC = dict(num_rows=36, seq_len=16, hidden_size=12, rows_per_chunk=4, chunks_per_shard=2)


def numpy_stats(hidden: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    x = hidden[mask.astype(bool)]
    norms = np.linalg.norm(hidden, axis=-1)
    with np.errstate(invalid="ignore"):
        position = (norms * mask).sum(0) / mask.sum(0)
    return {"x": x, "norms": norms[mask.astype(bool)], "position": position}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_stats_of_whole_store_match_numpy(tmp_path, dtype):
    store = write_store(tmp_path / "s", StoreSpec(**SPEC, dtype=dtype))
    rows = store.read_rows(0, store.spec.num_rows)
    hidden, mask = as_float64(rows["hidden"]), rows["attention_mask"].numpy()
    ref = numpy_stats(hidden, mask)
    stats = hidden_stats(store)

    assert stats.rows == 36 and stats.tokens == int(mask.sum()) < 36 * 16  # padding left out
    np.testing.assert_allclose(stats.mean, ref["x"].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.std, ref["x"].std(0), rtol=1e-5)
    np.testing.assert_allclose(stats.rms, np.sqrt((ref["x"] ** 2).mean(0)), rtol=1e-5)
    assert stats.norm_mean == pytest.approx(ref["norms"].mean(), rel=1e-5)
    assert stats.norm_min == pytest.approx(ref["norms"].min(), rel=1e-5)
    assert stats.norm_max == pytest.approx(ref["norms"].max(), rel=1e-5)
    np.testing.assert_allclose(stats.position_norm, ref["position"], rtol=1e-5)
    np.testing.assert_array_equal(stats.position_tokens, mask.sum(0))
    # fewer tokens than the sample holds: the distribution is exact
    np.testing.assert_allclose(np.sort(stats.norm_sample), np.sort(ref["norms"]), rtol=1e-5)
    for q, value in stats.norm_quantiles((0.01, 0.5, 0.99)).items():
        assert value == pytest.approx(np.quantile(ref["norms"], int(q[1:]) / 100), rel=1e-5)


def test_sample_is_whole_chunks_spread_over_the_store_and_matches_numpy(tmp_path):
    store = write_store(tmp_path / "s", StoreSpec(**SPEC, dtype="float32"))
    ranges = block_ranges(store, rows=10)
    picked = np.concatenate([np.arange(a, b) for a, b in ranges])
    assert len(picked) == 12  # 10 rows rounded up to 3 whole chunks of 4
    assert all(a % 4 == 0 for a, _ in ranges) and picked.max() >= 24  # not just the head
    rows = store.read_rows(0, 36)
    ref = numpy_stats(as_float64(rows["hidden"])[picked], rows["attention_mask"].numpy()[picked])
    stats = hidden_stats(store, rows=10)
    assert stats.rows == 12
    np.testing.assert_allclose(stats.mean, ref["x"].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.std, ref["x"].std(0), rtol=1e-5)


def test_dead_and_outlier_dimensions_follow_their_definitions(tmp_path):
    spec = StoreSpec(**SPEC, dtype="float32")
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((36, 16, 12)).astype(np.float32)
    hidden[..., 3] = 0.25  # constant: dead
    hidden[..., 7] += 40.0  # huge mean: an outlier dimension, as in trained BERTs
    store = write_store(tmp_path / "s", spec, hidden)
    stats = hidden_stats(store)
    x = hidden[store.read_rows(0, 36)["attention_mask"].numpy().astype(bool)]
    std, rms = x.std(0), np.sqrt((x.astype(np.float64) ** 2).mean(0))
    assert stats.dead_dims == np.flatnonzero(std <= DEAD_REL_STD * np.median(std)).tolist() == [3]
    expected = np.flatnonzero(rms > rms.mean() + OUTLIER_SIGMAS * rms.std()).tolist()
    assert stats.outlier_dims == expected == [7]
    assert stats.dead_share == stats.outlier_share == pytest.approx(1 / 12)


def test_std_survives_a_large_mean(tmp_path):
    """Outlier dimensions have means far above their spread: no catastrophic cancellation."""
    rng = np.random.default_rng(1)
    hidden = (1000.0 + 0.01 * rng.standard_normal((36, 16, 12))).astype(np.float32)
    store = write_store(tmp_path / "s", StoreSpec(**SPEC, dtype="float32"), hidden)
    rows = store.read_rows(0, 36)
    x = as_float64(rows["hidden"])[rows["attention_mask"].numpy().astype(bool)]
    np.testing.assert_allclose(hidden_stats(store).std, x.std(0), rtol=1e-3)


def test_summary_reports_shape_dtype_size_and_completeness(tmp_path):
    spec = StoreSpec(**SPEC, dtype="bfloat16", codec="zstd")
    write_store(tmp_path / "s", spec, attrs={"stage": 3, "frozen_layers": 2})
    s = summarize_store(str(tmp_path / "s"))
    assert s.status == "ok" and s.exit_code == 0 and s.problem is None
    assert (s.spec["num_rows"], s.spec["seq_len"], s.spec["hidden_size"]) == (36, 16, 12)
    assert (s.spec["dtype"], s.spec["codec"]) == ("bfloat16", "zstd")
    assert (s.shards_done, s.num_shards) == (5, 5)
    assert s.provenance["stage"] == 3 and s.provenance["frozen_layers"] == 2
    on_disk = sum(p.stat().st_size for p in (tmp_path / "s").rglob("*") if p.is_file())
    assert s.disk_bytes == on_disk
    # all four row arrays, uncompressed: hidden bf16 + mask u8 + labels i32 + row_index i64
    assert s.logical_bytes == 36 * 16 * (12 * 2 + 1 + 4) + 36 * 8
    assert s.compression_ratio == pytest.approx(s.logical_bytes / on_disk)
    assert s.validity is None  # not inside a run


def test_stats_accumulator_merges_blocks_exactly_like_one_pass():
    from cached_mslt.inspect.stats import StatsAccumulator

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 8, 6, generator=g) * 3 + 5
    mask = torch.ones(20, 8, dtype=torch.long)
    mask[3, 5:] = 0
    one, many = StatsAccumulator(8, 6), StatsAccumulator(8, 6)
    one.update(hidden, mask)
    for a in range(0, 20, 3):
        many.update(hidden[a : a + 3], mask[a : a + 3])
    r1, r2 = one.result(), many.result()
    np.testing.assert_allclose(r1.mean, r2.mean, rtol=1e-6)
    np.testing.assert_allclose(r1.std, r2.std, rtol=1e-5)
    np.testing.assert_allclose(np.sort(r1.norm_sample), np.sort(r2.norm_sample), rtol=1e-5)


def test_norm_sample_is_a_bounded_uniform_sample(monkeypatch):
    from cached_mslt.inspect import stats as stats_module

    monkeypatch.setattr(stats_module, "NORM_SAMPLE", 500)
    acc = stats_module.StatsAccumulator(10, 4)
    scale = torch.arange(1, 401, dtype=torch.float32).repeat_interleave(10)  # norms 2..800
    for a in range(0, 400, 37):  # 4,000 tokens in uneven blocks
        hidden = (
            torch.ones(len(scale[a * 10 : (a + 37) * 10]), 4) * scale[a * 10 : (a + 37) * 10, None]
        )
        acc.update(hidden.reshape(-1, 10, 4), torch.ones(len(hidden) // 10, 10, dtype=torch.long))
    result = acc.result()
    assert len(result.norm_sample) == 500 and result.tokens == 4000
    assert set(result.norm_sample.round(3)) <= set((2 * scale.double().numpy()).round(3))
    assert result.norm_quantiles((0.5,))["p50"] == pytest.approx(401, rel=0.1)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_summary_logical_bytes_are_what_an_uncompressed_store_holds(tmp_path, dtype):
    # Without a codec the chunk files hold the logical bytes plus a 4-byte crc32c per chunk
    # and each shard's index; an int8 row is 1 byte per value and 1 exponent per token.
    write_store(tmp_path / "s", StoreSpec(**SPEC, dtype=dtype))
    s = summarize_store(str(tmp_path / "s"))
    width = {"float32": 12 * 4, "float16": 12 * 2, "int8": 12 + 1}[dtype]
    assert s.logical_bytes == 36 * 16 * (width + 1 + 4) + 36 * 8
    row_arrays = ("hidden", "attention_mask", "labels", "row_index")
    chunk_files = [p for a in row_arrays for p in (tmp_path / "s" / a / "c").rglob("*")]
    held = sum(p.stat().st_size for p in chunk_files if p.is_file())
    assert s.logical_bytes <= held < 1.1 * s.logical_bytes
