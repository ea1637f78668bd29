"""Training-side benchmarks: what caching buys per step, measured as ratios in one run.

Each figure is a dict `{"name", "value", "unit", ...}` with `model_ratio` where
the cost model of docs/design.md (as counted by `cached_mslt.training.flops`) predicts it. Timings are
medians over interleaved repeats, so a noisy neighbour slows both sides of a ratio.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from cached_mslt.bench.interleave import Rounds, interleaved_rounds
from cached_mslt.config import PRESETS, ModelArgs, TrainArgs
from cached_mslt.models import (
    IGNORE_INDEX,
    TopModel,
    bottom_forward,
    build_model,
    decay_param_groups,
    freeze_bottom,
    run_layers,
)
from cached_mslt.stages import CacheRequest, block_rows_for, build_cache
from cached_mslt.training import (
    SQUARE,
    Peak,
    ffn_shape,
    host_batch,
    layer_forward_flops,
    matmul_flops_per_s,
    padded_gather_per_row,
    step_flops,
)
from storage import (
    ActivationStore,
    BlockDataset,
    StoreSpec,
    make_block_loader,
)


def run_shape(preset: str) -> tuple[int, float]:
    """The vocabulary size and masking rate a run of `preset` trains with (config.PRESETS):
    the MLM head's share of a step depends on both (docs/benchmarks.md)."""
    return PRESETS[preset]["vocab_size"], PRESETS[preset]["mask_prob"]


def _batch(preset: str, rows: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids of `preset`'s vocabulary, labelled at its masking rate."""
    vocab, mask_prob = run_shape(preset)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, seq_len), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    chosen = torch.rand(rows, seq_len, generator=g) < mask_prob
    labels[chosen] = ids[chosen]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def bench_model(preset: str, layers: int = 12):
    """A `layers`-layer model of `preset` with the vocabulary a run of it has."""
    return build_model(ModelArgs(preset=preset), run_shape(preset)[0], layers)


def cached_case(
    preset: str, frozen: int, rows: int, seq_len: int = 128, layers: int = 12, device="cpu"
):
    """What a cached step starts from: the model (on `device`), a batch at the preset's run
    shape and the frozen bottom's output for it in float16, as a store holds it (both on
    the host, where a loader delivers them). The batch is unpadded, so the bottom runs
    without a mask, as the trainer runs it (`host_batch`)."""
    model = bench_model(preset, layers)
    data = _batch(preset, rows, seq_len)
    with torch.no_grad():
        model.eval()
        hidden16 = bottom_forward(model, data["input_ids"], None, frozen).half()
    return model.to(device), data, hidden16


class _FakePrepared:
    """Token-id rows in RAM with the prepared dataset's slicing interface."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, key):
        return {k: v[key] for k, v in self.batch.items()}


def trainer_step(
    model,
    frozen: int,
    inputs: Callable[[], dict],
    *,
    bf16: bool = False,
    compiled: bool = False,
    mask_prob: float = 0.15,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> Callable[[], torch.Tensor]:
    """One optimizer step of the top above `frozen` as cached_mslt/training/trainer.py takes it: the
    batch counted on the host with its gather targets (`host_batch`), the top under bf16
    autocast when asked (compiled: through torch.compile, with the padded gather), backward,
    clipping to norm 1, fused AdamW. `inputs()` gives labels, attention_mask and the top's
    input (token ids or hidden states) on the host; the step copies them to the model's
    device, as the trainer does, and on a GPU waits for its work, so a call's time is the
    step's. Not timed: the trainer's non-finite skip and its device tallies (a few scalar
    ops). `wrap` (e.g. `Accelerator.prepare_model`) puts the top in DDP across launched
    processes, as a run does. Returns the step, which returns its loss."""
    device = next(model.parameters()).device
    params = freeze_bottom(model, frozen)
    top = TopModel(model, frozen)
    if compiled:
        top.compile()
    if wrap is not None:
        top = wrap(top)
    opt = torch.optim.AdamW(decay_param_groups(model, 0.01, params), lr=1e-4, fused=True)
    per_row = None  # set from the first batch's length when compiled

    def step() -> torch.Tensor:
        nonlocal per_row
        freeze_bottom(model, frozen)  # the bench's steps share one model, each its own frozen part
        batch = inputs()
        if compiled and per_row is None:
            per_row = padded_gather_per_row(mask_prob, batch["labels"].shape[1])
        _, batch = host_batch(batch, per_row)
        batch = {k: v if v is None else v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss, _ = top(batch.pop("labels"), batch.pop("attention_mask"), **batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss.detach()

    return step


def _write_store(url: str, spec: StoreSpec, rows: dict, fingerprint: dict) -> ActivationStore:
    """A complete store holding `rows`, opened read-only as a run opens it."""
    store = ActivationStore.create(url, spec, fingerprint=fingerprint)
    for shard in range(store.num_shards):
        lo, hi = store.shard_rows(shard)
        store.write_shard(shard, **{k: v[lo:hi] for k, v in rows.items()})
    store.commit()
    return ActivationStore.open(url)


def _store_feed(url: str, hidden16, data: dict, copies: int) -> Callable[[], dict]:
    """Batches as a cached run takes them: `copies` times the batch's rows in a float16
    store on disk, read by `make_block_loader` with a run's defaults (blocks of
    `block_rows_for(batch)` rows, shuffled, `TrainArgs().num_workers` workers), widened to
    float32 as the trainer does, endlessly."""
    rows, seq_len, hidden = *hidden16.shape[:2], hidden16.shape[2]
    tiled = {
        "hidden": hidden16.repeat(copies, 1, 1),
        "attention_mask": data["attention_mask"].repeat(copies, 1),
        "labels": data["labels"].repeat(copies, 1),
        "row_index": torch.arange(rows * copies),
    }
    block = block_rows_for(rows)
    spec = StoreSpec(
        num_rows=rows * copies, seq_len=seq_len, hidden_size=hidden, rows_per_chunk=block
    )
    store = _write_store(url, spec, tiled, {"bench": "store-fed step"})
    loader = make_block_loader(
        BlockDataset(store, block_rows=block),
        rows_per_batch=rows,
        shuffle=True,
        seed=0,
        num_workers=TrainArgs().num_workers,
    )

    def batches():
        for epoch in itertools.count():
            loader.set_epoch(epoch)
            yield from loader

    stream = batches()

    def next_inputs() -> dict:
        b = next(stream)
        # what cached_mslt.training.trainer hands the top from a store batch
        hidden_states = b["hidden"].float()
        return {
            "labels": b["labels"],
            "attention_mask": b["attention_mask"],
            "hidden_states": hidden_states,
        }

    return next_inputs


def _matmuls(config, tokens: int) -> dict[str, tuple[Callable[[], Any], float]]:
    """The peak references timed among the steps: fp32 matmuls at the model's FFN shape
    ([tokens, H] x [H, I]) and at a large square, with their FLOPs per call."""
    out = {}
    for name, (m, k, n) in {
        "matmul_ffn": ffn_shape(config, tokens),
        "matmul_square": (SQUARE, SQUARE, SQUARE),
    }.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        out[name] = (lambda a=a, b=b: a @ b, 2.0 * m * k * n)
    return out


# figure -> (slower step, faster step): how many times faster the second runs
STEP_RATIOS = {
    "cached_vs_live_step": ("live", "cached"),
    "cached_vs_full_step": ("full", "cached"),
    "store_vs_ram_cached_step": ("cached", "store"),  # >= 0.95: the loader costs the step little
    "store_cached_vs_live_step": ("live", "store"),
    "store_cached_vs_full_step": ("full", "store"),
}


def step_benchmarks(
    preset: str,
    *,
    frozen: int = 9,
    layers: int = 12,
    batch_rows: int = 32,
    seq_len: int = 128,
    cap_s: float = 60.0,
    window: int = 5,
    peak: Peak | None = None,
) -> list[dict]:
    """Tokens/s and MFU of a cached top step (fed from RAM and from a store on disk), a live
    MSLT step and a full-model step, their ratios, and the matmul references, all timed in
    the same interleaved rounds (cached_mslt/bench/interleave.py)."""
    torch.set_flush_denormal(True)  # AdamW's tiny second moments are denormal; CPUs crawl on them
    model, data, hidden16 = cached_case(preset, frozen, batch_rows, seq_len, layers)
    ids, mask = data["input_ids"], data["attention_mask"]
    tokens, masked = batch_rows * seq_len, int((data["labels"] != IGNORE_INDEX).sum())

    def batch(**top_input) -> dict:
        return {"labels": data["labels"], "attention_mask": mask, **top_input}

    @torch.no_grad()
    def live() -> dict:
        return batch(hidden_states=bottom_forward(model, ids, mask, frozen))

    matmuls = _matmuls(model.config, tokens)
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        from_store = _store_feed(f"{tmp}/store", hidden16, data, copies=8)
        fns = {
            # what a float16 store hands over, already in RAM
            "cached": trainer_step(model, frozen, lambda: batch(hidden_states=hidden16.float())),
            "store": trainer_step(model, frozen, from_store),
            "live": trainer_step(model, frozen, live),
            "full": trainer_step(model, 0, lambda: batch(input_ids=ids)),
            **{name: fn for name, (fn, _) in matmuls.items()},
        }
        pairs = list(STEP_RATIOS.values())
        pairs += [(m, k) for m in matmuls for k in ("cached", "store")]
        rounds = interleaved_rounds(fns, pairs, window=window, cap_s=cap_s)
    flops = _step_flops(model.config, frozen, layers, tokens, masked, seq_len)
    flops["store"] = flops["cached"]  # the store holds the same batch's rows (8 copies)
    rates = {name: f / rounds.median_s(name) for name, (_, f) in matmuls.items()}
    peak = peak or Peak(rates["matmul_square"], f"measured: fp32 matmul {SQUARE}^3, same rounds")
    tag = {"preset": preset, "frozen": frozen, "trained": layers - frozen, "batch_tokens": tokens}
    out = [_matmul_figure(n, rates[n], matmuls, rounds, tag) for n in matmuls]
    for kind in ("cached", "store", "live", "full"):
        out.append(_step_figure(kind, tokens, flops[kind], rounds, peak, rates["matmul_ffn"], tag))
    for name, (slow, fast) in STEP_RATIOS.items():
        ratio = rounds.ratio(slow, fast)
        out.append({"name": name, **ratio, "model_ratio": flops[slow] / flops[fast], **tag})
    return out


def _step_flops(config, frozen, layers, tokens, masked, seq_len) -> dict[str, float]:
    """Counted FLOPs of each kind of step: (trained layers, frozen layers run live, decoder
    weight trains) per kind."""
    shapes = {
        "cached": (layers - frozen, 0, False),
        "live": (layers - frozen, frozen, False),
        "full": (layers, 0, True),
    }
    return {
        kind: step_flops(
            config,
            tokens=tokens,
            masked_tokens=masked,
            trained_layers=trained,
            frozen_live_layers=live_layers,
            seq_len=seq_len,
            decoder_weight_trains=decoder,
        )
        for kind, (trained, live_layers, decoder) in shapes.items()
    }


def _step_figure(kind, tokens, flops, rounds: Rounds, peak: Peak, ffn_rate, tag) -> dict:
    """tokens/s of one kind of step (median over the rounds used, min-max beside it), its
    MFU against the peak and against the FFN-shape matmul timed in the same rounds."""
    times = rounds.used(kind)
    median = rounds.median_s(kind)
    return {
        "name": f"{kind}_step_tokens_per_s",
        "value": tokens / median,
        "min": tokens / max(times),
        "max": tokens / min(times),
        "unit": "tokens/s",
        "flops_per_s": flops / median,
        "mfu": peak.mfu(flops, median),
        "mfu_vs_ffn_matmul": flops / median / ffn_rate,
        **peak.to_dict(),
        "rounds": len(times),
        "stopped": rounds.stopped,
        **tag,
    }


def _matmul_figure(name, rate, matmuls, rounds: Rounds, tag) -> dict:
    times = rounds.used(name)
    flops = matmuls[name][1]
    return {
        "name": f"{name}_flops_per_s",
        "value": rate,
        "min": flops / max(times),
        "max": flops / min(times),
        "unit": "FLOP/s",
        "threads": torch.get_num_threads(),
        **tag,
    }


def _synthetic_source(url: str, model, rows: dict, frozen: int, dtype: str) -> ActivationStore:
    """A stage store of `frozen` layers for the build to start from: normal hidden states
    (what a post-LN layer's output looks like) beside the batch's masks and labels. Running
    the model's first layers to make it would cost more than the build measured."""
    n, seq_len = rows["input_ids"].shape
    hidden = torch.randn(n, seq_len, model.config.hidden_size).to(getattr(torch, dtype))
    spec = StoreSpec(
        num_rows=n,
        seq_len=seq_len,
        hidden_size=model.config.hidden_size,
        dtype=dtype,
        rows_per_chunk=8,
    )
    content = {"hidden": hidden, "row_index": torch.arange(n)}
    content |= {k: rows[k] for k in ("attention_mask", "labels")}
    return _write_store(url, spec, content, {"frozen_layers": str(frozen)})


def _plain_forward(model, hidden, first: int, last: int, batch: int = 64) -> Callable[[], None]:
    """A torch.no_grad() forward of layers first..last over `hidden` in RAM, in the build's
    batches, widened and narrowed as the build does: what the build cannot beat."""
    mask = torch.ones(hidden.shape[:2], dtype=torch.long)

    @torch.no_grad()
    def forward() -> None:
        for a in range(0, len(hidden), batch):
            h = hidden[a : a + batch].float()
            run_layers(model, h, mask[a : a + batch], first, last).half()

    return forward


def build_benchmark(
    preset: str,
    *,
    rows: int = 4096,
    seq_len: int = 128,
    first: int = 6,
    last: int = 9,
    plain_rows: int = 512,
    peak: Peak | None = None,
) -> list[dict]:
    """Incremental cache build (layers first..last over a store, on disk) vs a plain
    no_grad forward of the same layers in RAM, per row; the build's MFU. The plain forward
    runs over `plain_rows` rows right before and right after the one build (its rate is
    per row, the batch the same), so the pair brackets the build in time and the spread is
    the two. Also the store loader's rows/s, for `loader_vs_train_consumption`."""
    torch.set_flush_denormal(True)
    model = bench_model(preset).eval()
    timing = _time_build(model, preset, rows, seq_len, first, last, plain_rows)
    flops = rows * seq_len * (last - first) * layer_forward_flops(model.config, seq_len)
    peak = peak or Peak(
        statistics.mean(timing["square"]), f"measured: fp32 matmul {SQUARE}^3 before and after"
    )
    return _build_figures(
        timing,
        flops,
        peak,
        rows,
        plain_rows,
        {"preset": preset, "rows": rows, "layers": last - first},
    )


def _time_build(
    model, preset: str, rows: int, seq_len: int, first: int, last: int, plain_rows: int
) -> dict:
    """Seconds of one build between two plain forwards, the square matmul's rate before
    and after, and the store loader's rows/s."""
    batch = _batch(preset, rows, seq_len)
    data = _FakePrepared(batch)
    # build_cache reports progress on stdout; bench's stdout is JSON lines only.
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        source = _synthetic_source(f"{tmp}/a", model, batch, first, "float16")
        plain = _plain_forward(model, source.read_rows(0, plain_rows)["hidden"], first, last)
        plain()  # warm up: first-call allocations
        plain_s = [_timed(plain)]
        square = [matmul_flops_per_s(SQUARE, SQUARE, SQUARE)]
        request = CacheRequest(
            url=f"{tmp}/b",
            frozen_layers=last,
            stage=3,
            dtype="float16",
            codec="none",
            rows_per_chunk=8,
            data_fingerprint="bench",
            mask_seed=0,
            seq_len=seq_len,
            num_rows=rows,
        )
        build_s = _timed(lambda: build_cache(model, request, data, source=source))
        plain_s.append(_timed(plain))
        square.append(matmul_flops_per_s(SQUARE, SQUARE, SQUARE))
        loader_rows_s = _loader_rows_per_s(source)
    return {"build_s": build_s, "plain_s": plain_s, "square": square, "loader": loader_rows_s}


def _build_figures(
    timing: dict, flops: float, peak: Peak, rows: int, plain_rows: int, tag: dict
) -> list[dict]:
    build_s, plain_s = timing["build_s"], timing["plain_s"]
    build_rate, plain_rates = rows / build_s, [plain_rows / s for s in plain_s]
    ratios = [build_rate / r for r in plain_rates]
    how = f"one build of {rows} rows between plain forwards of {plain_rows} rows"
    return [
        {
            "name": "build_rows_per_s",
            "value": build_rate,
            "unit": "rows/s",
            "mfu": peak.mfu(flops, build_s),
            **peak.to_dict(),
            **tag,
        },
        {
            "name": "nograd_forward_rows_per_s",
            "value": statistics.mean(plain_rates),
            "min": min(plain_rates),
            "max": max(plain_rates),
            "unit": "rows/s",
            "mfu": peak.mfu(flops / rows * plain_rows, statistics.mean(plain_s)),
            **tag,
        },
        {
            "name": "build_vs_nograd_forward",
            "value": statistics.mean(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "rounds": 2,
            "stopped": how,
            "unit": "x",
            **tag,
        },
        {"name": "store_loader_rows_per_s", "value": timing["loader"], "unit": "rows/s", **tag},
    ]


def _timed(fn: Callable[[], Any]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def _loader_rows_per_s(store: ActivationStore, epochs: int = 3) -> float:
    """Rows/s of a shuffled epoch of the block loader over `store`: the median of `epochs`
    epochs (one epoch's rate moved by a fifth between two runs on an idle machine)."""
    loader = make_block_loader(
        BlockDataset(store, block_rows=8), rows_per_batch=32, shuffle=True, seed=0
    )
    rates = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        started = time.perf_counter()
        n = sum(len(b["labels"]) for b in loader)
        rates.append(n / (time.perf_counter() - started))
    return statistics.median(rates)


# Rows of the build figure per preset: enough that creating and committing the store
# (fixed costs) weigh under a percent, as in a real stage (docs/benchmarks.md).
BUILD_ROWS = {"tiny": 4096, "mini": 1024}


def all_benchmarks(quick: bool, s3: bool = False, peak_tflops: float | None = None) -> list[dict]:
    """Every figure `pipelines/bench.py` prints: storage, the step ratios and MFU per preset
    (tiny and mini), the build ratio, and how much faster the store feeds rows than the top
    step eats them; with `s3`, also the store figures on an S3 API on loopback and the
    loader ratio there. `peak_tflops` replaces the measured matmul as the MFU reference."""
    from cached_mslt.bench.inspect import inspect_benchmarks
    from cached_mslt.bench.store import s3_storage_benchmarks, storage_benchmarks

    peak = Peak(peak_tflops * 1e12, "--peak_tflops") if peak_tflops else None
    figures = storage_benchmarks(quick=quick) + inspect_benchmarks(quick)
    remote = s3_storage_benchmarks(quick) if s3 else []
    figures += remote
    for preset in ("tiny", "mini"):
        steps = step_benchmarks(preset, cap_s=45.0 if quick else 180.0, peak=peak)
        build = build_benchmark(preset, rows=BUILD_ROWS[preset], peak=peak)
        figures += steps + build
        if preset == "tiny":
            figures += _loader_vs_train(steps, build, remote)
    return figures


def _loader_vs_train(steps: list[dict], build: list[dict], remote: list[dict]) -> list[dict]:
    """Rows/s the store loader supplies over rows/s the tiny cached step consumes, for the
    local store and (with --s3) the loopback S3 one."""
    consumed = next(f for f in steps if f["name"] == "cached_step_tokens_per_s")["value"] / 128
    supplied = [(next(f for f in build if f["name"] == "store_loader_rows_per_s")["value"], {})]
    supplied += [
        (f["value"], {"backend": "s3-loopback", "num_workers": f["num_workers"]})
        for f in remote
        if f["name"] == "store_loader_rows" and f["shape"] == "tiny"
    ]
    return [
        {
            "name": "loader_vs_train_consumption",
            "value": rate / consumed,
            "unit": "x",
            "preset": "tiny",
            **extra,
            "loader_rows_per_s": rate,
            "train_rows_per_s": consumed,
        }
        for rate, extra in supplied
    ]
