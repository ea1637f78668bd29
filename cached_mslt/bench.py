"""Training-side benchmarks: what caching buys per step, measured as ratios in one run.

Each figure is a dict `{"name", "value", "unit", ...}` with `model_ratio` where
the cost model of docs/design.md (as counted by `cached_mslt.flops`) predicts it. Timings are
medians over interleaved repeats, so a noisy neighbour slows both sides of a ratio.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.benchmark as benchmark

from cached_mslt.cache import CacheRequest, build_cache
from cached_mslt.config import ModelArgs
from cached_mslt.flops import step_flops
from cached_mslt.model import TopModel, bottom_forward, build_model, freeze_bottom, run_layers
from storage import BlockDataset, make_block_loader

VOCAB = 30522


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 0
) -> dict[str, float]:
    """Median seconds per call of each function, from `torch.utils.benchmark` measurements
    taken in turns (one `blocked_autorange` of each per round), so drift on a shared machine
    hits every side of a ratio alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    timers = {
        name: benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        for name, fn in fns.items()
    }
    runs: dict[str, list[benchmark.Measurement]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, timer in timers.items():
            runs[name].append(timer.blocked_autorange(min_run_time=0.0))
    return {name: benchmark.Measurement.merge(m)[0].median for name, m in runs.items()}


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


def _train_step(model, data, frozen_layers: int, inputs: Callable[[], dict]) -> Callable[[], None]:
    """One optimizer step of the top above `frozen_layers`, fed by `inputs()`."""
    params = freeze_bottom(model, frozen_layers)
    top = TopModel(model, frozen_layers)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        freeze_bottom(model, frozen_layers)
        loss, _ = top(data["labels"], data["attention_mask"], **inputs())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


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
    model = build_model(ModelArgs(preset=preset), VOCAB, layers)
    data = _batch(batch_rows, seq_len)
    ids, mask = data["input_ids"], data["attention_mask"]
    tokens, masked = batch_rows * seq_len, int((data["labels"] != -100).sum())
    with torch.no_grad():
        model.eval()
        hidden16 = bottom_forward(model, ids, mask, frozen).half()

    @torch.no_grad()
    def live() -> dict:
        return {"hidden_states": bottom_forward(model, ids, mask, frozen)}

    steps = {
        # what a float16 store hands over
        "cached": _train_step(model, data, frozen, lambda: {"hidden_states": hidden16.float()}),
        "live": _train_step(model, data, frozen, live),
        "full": _train_step(model, data, 0, lambda: {"input_ids": ids}),
    }
    t = interleaved_medians(steps, repeats, warmup=2)
    # (trained layers, frozen layers run live, decoder weight trains) per kind of step
    shapes = {
        "cached": (layers - frozen, 0, False),
        "live": (layers - frozen, frozen, False),
        "full": (layers, 0, True),
    }
    flops = {
        kind: step_flops(
            model.config,
            tokens=tokens,
            masked_tokens=masked,
            trained_layers=trained,
            frozen_live_layers=live_layers,
            seq_len=seq_len,
            decoder_weight_trains=decoder,
        )
        for kind, (trained, live_layers, decoder) in shapes.items()
    }
    tag = {"preset": preset, "frozen": frozen, "trained": layers - frozen, "batch_tokens": tokens}
    out = [
        {"name": f"{k}_step_tokens_per_s", "value": tokens / v, "unit": "tokens/s", **tag}
        for k, v in t.items()
    ]
    for other in ("live", "full"):
        ratio = {"value": t[other] / t["cached"], "model_ratio": flops[other] / flops["cached"]}
        out.append({"name": f"cached_vs_{other}_step", **ratio, "unit": "x", **tag})
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

        plain_s = interleaved_medians({"plain": plain}, repeats=3, warmup=1)["plain"]
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
