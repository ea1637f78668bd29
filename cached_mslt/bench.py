"""Training-side benchmarks: what caching buys per step, measured as ratios in one run.

Each figure is a dict `{"name", "value", "unit", ...}` with `model_ratio` where
the cost model of docs/design.md (as counted by `cached_mslt.flops`) predicts it. Timings are
medians over interleaved repeats, so a noisy neighbour slows both sides of a ratio.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from cached_mslt.cache import CacheRequest, build_cache
from cached_mslt.config import ModelArgs
from cached_mslt.flops import step_flops
from cached_mslt.model import TopModel, bottom_forward, build_model, freeze_bottom, run_layers
from storage import BlockDataset, make_block_loader

VOCAB = 30522


def _median_times(
    fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 2
) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():  # interleaved: drift on a shared machine hits every side
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _batch(rows: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB, (rows, seq_len), generator=g)
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(rows, seq_len, generator=g) < 0.15
    labels[chosen] = ids[chosen]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class _FakePrepared:
    """Token-id rows in RAM with the prepared dataset's slicing interface."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, key):
        return {k: v[key] for k, v in self.batch.items()}


def step_benchmarks(
    preset: str,
    *,
    frozen: int = 9,
    layers: int = 12,
    batch_rows: int = 32,
    seq_len: int = 128,
    repeats: int = 5,
) -> list[dict]:
    """Tokens/s of a cached top step, a live MSLT step and a full-model step, and ratios."""
    torch.set_flush_denormal(True)  # AdamW's tiny second moments are denormal; CPUs crawl on them
    margs = ModelArgs(preset=preset)
    model = build_model(margs, VOCAB, layers)
    data = _batch(batch_rows, seq_len)
    tokens = batch_rows * seq_len
    masked = int((data["labels"] != -100).sum())
    with torch.no_grad():
        model.eval()
        hidden16 = bottom_forward(model, data["input_ids"], data["attention_mask"], frozen).half()

    def make_step(frozen_layers: int, source: str) -> Callable[[], None]:
        params = freeze_bottom(model, frozen_layers)
        top = TopModel(model, frozen_layers)
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step() -> None:
            freeze_bottom(model, frozen_layers)
            if source == "cache":
                inputs = {"hidden_states": hidden16.float()}  # what a float16 store hands over
            elif source == "live":
                with torch.no_grad():
                    inputs = {
                        "hidden_states": bottom_forward(
                            model, data["input_ids"], data["attention_mask"], frozen
                        )
                    }
            else:
                inputs = {"input_ids": data["input_ids"]}
            loss, _ = top(data["labels"], data["attention_mask"], **inputs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    steps = {
        "cached": make_step(frozen, "cache"),
        "live": make_step(frozen, "live"),
        "full": make_step(0, "tokens"),
    }
    t = _median_times(steps, repeats)
    c = model.config
    f_cached = step_flops(
        c,
        tokens=tokens,
        masked_tokens=masked,
        trained_layers=layers - frozen,
        frozen_live_layers=0,
        seq_len=seq_len,
        decoder_weight_trains=False,
    )
    f_live = step_flops(
        c,
        tokens=tokens,
        masked_tokens=masked,
        trained_layers=layers - frozen,
        frozen_live_layers=frozen,
        seq_len=seq_len,
        decoder_weight_trains=False,
    )
    f_full = step_flops(
        c,
        tokens=tokens,
        masked_tokens=masked,
        trained_layers=layers,
        frozen_live_layers=0,
        seq_len=seq_len,
        decoder_weight_trains=True,
    )
    tag = {"preset": preset, "frozen": frozen, "trained": layers - frozen, "batch_tokens": tokens}
    out = [
        {"name": f"{k}_step_tokens_per_s", "value": tokens / v, "unit": "tokens/s", **tag}
        for k, v in t.items()
    ]
    out.append(
        {
            "name": "cached_vs_live_step",
            "value": t["live"] / t["cached"],
            "unit": "x",
            "model_ratio": f_live / f_cached,
            **tag,
        }
    )
    out.append(
        {
            "name": "cached_vs_full_step",
            "value": t["full"] / t["cached"],
            "unit": "x",
            "model_ratio": f_full / f_cached,
            **tag,
        }
    )
    return out


def build_benchmark(
    preset: str, *, rows: int = 512, seq_len: int = 128, first: int = 6, last: int = 9
) -> list[dict]:
    """Incremental cache build (layers first..last over a store) vs a plain no_grad forward of
    the same layers over the same rows in RAM. Also the store loader against the rate the
    top step consumes rows, for `loader_vs_train_consumption`."""
    torch.set_flush_denormal(True)
    model = build_model(ModelArgs(preset=preset), VOCAB, 12).eval()
    data = _FakePrepared(_batch(rows, seq_len))
    # build_cache reports progress on stdout; bench's stdout is JSON lines only.
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        common = dict(
            dtype="float16",
            codec="none",
            rows_per_chunk=8,
            data_fingerprint="bench",
            mask_seed=0,
            seq_len=seq_len,
            num_rows=rows,
        )
        source, _ = build_cache(
            model, CacheRequest(url=f"{tmp}/a", frozen_layers=first, stage=2, **common), data
        )
        started = time.perf_counter()
        _, stats = build_cache(
            model,
            CacheRequest(url=f"{tmp}/b", frozen_layers=last, stage=3, **common),
            data,
            source=source,
        )
        build_s = time.perf_counter() - started
        hidden = source.read_rows(0, rows)["hidden"]
        mask = torch.ones(rows, seq_len, dtype=torch.long)

        def plain() -> None:
            with torch.no_grad():
                for a in range(0, rows, 64):
                    run_layers(
                        model, hidden[a : a + 64].float(), mask[a : a + 64], first, last
                    ).half()

        plain_s = _median_times({"plain": plain}, repeats=3, warmup=1)["plain"]
        loader = make_block_loader(
            BlockDataset(source, block_rows=8), rows_per_batch=32, shuffle=True, seed=0
        )
        started = time.perf_counter()
        n = sum(len(b["labels"]) for b in loader)
        loader_rows_s = n / (time.perf_counter() - started)
    tag = {"preset": preset, "rows": rows, "layers": last - first}
    return [
        {"name": "build_rows_per_s", "value": rows / build_s, "unit": "rows/s", **tag},
        {"name": "nograd_forward_rows_per_s", "value": rows / plain_s, "unit": "rows/s", **tag},
        {"name": "build_vs_nograd_forward", "value": plain_s / build_s, "unit": "x", **tag},
        {"name": "store_loader_rows_per_s", "value": loader_rows_s, "unit": "rows/s", **tag},
    ]


def all_benchmarks(quick: bool, s3: bool = False) -> list[dict]:
    """Every figure `pipelines/bench.py` prints: storage, the step ratios per preset, the
    build ratio, and how much faster the store feeds rows than the top step eats them;
    with `s3`, also the store figures on an S3 API on loopback and the loader ratio there."""
    from cached_mslt.inspect.bench import inspect_benchmarks
    from storage.bench import s3_storage_benchmarks, storage_benchmarks

    figures = storage_benchmarks(quick=quick) + inspect_benchmarks(quick)
    remote = s3_storage_benchmarks(quick) if s3 else []
    figures += remote
    presets = ["tiny"] if quick else ["tiny", "mini"]
    for preset in presets:
        steps = step_benchmarks(preset, repeats=3 if quick else 5)
        build = build_benchmark(preset, rows=256 if quick else 1024)
        figures += steps + build
        if preset == "tiny":
            consumed = (
                next(f for f in steps if f["name"] == "cached_step_tokens_per_s")["value"] / 128
            )
            supplied = next(f for f in build if f["name"] == "store_loader_rows_per_s")["value"]
            figures.append(
                {
                    "name": "loader_vs_train_consumption",
                    "value": supplied / consumed,
                    "unit": "x",
                    "preset": preset,
                    "loader_rows_per_s": supplied,
                    "train_rows_per_s": consumed,
                }
            )
            for f in remote:
                if f["name"] == "store_loader_rows" and f["shape"] == "tiny":
                    figures.append(
                        {
                            "name": "loader_vs_train_consumption",
                            "value": f["value"] / consumed,
                            "unit": "x",
                            "preset": preset,
                            "backend": "s3-loopback",
                            "num_workers": f["num_workers"],
                            "loader_rows_per_s": f["value"],
                            "train_rows_per_s": consumed,
                        }
                    )
    return figures
