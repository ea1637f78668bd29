"""Building a stage's activation store: a forward-only pass of the frozen bottom, spread
over every process (shard s belongs to process s % world_size), resumable.

Incremental rebuild: when stage k's store exists, stage k+1's store is that store pushed
through only the layers stage k trained, so each layer's forward runs once per example
over the whole schedule. A store's bytes are one function of its fingerprint whatever path
built them (`frozen_output`): a 16-bit store is rounded at every earlier stage boundary,
where an incremental build reads its rounded source, so a full rebuild from token ids
gives the incremental store's bytes; in float32 rounding is the identity and the layer
math does not depend on batch composition here (docs/library-facts.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from tqdm.auto import tqdm
from transformers import BertForMaskedLM

from cached_mslt.data import PreparedBlocks
from cached_mslt.models import (
    bottom_fingerprint,
    bottom_forward,
    frozen_modules,
    run_layers,
)
from cached_mslt.stages.background import ShardWriter, read_ahead
from storage import (
    ActivationStore,
    IncompleteStoreError,
    StoreError,
    StoreNotFoundError,
    StoreSpec,
    round_to_store,
)

SHARD_ARRAYS = ("hidden", "attention_mask", "labels", "row_index")
WRITE_THROUGH = "write-through"  # a store's `built` attribute when training steps fill it


@dataclass(frozen=True)
class CacheRequest:
    url: str
    frozen_layers: int
    dtype: str
    codec: str
    rows_per_chunk: int
    data_fingerprint: str
    mask_seed: int
    seq_len: int
    num_rows: int
    stage: int
    # The frozen layers' compute precision: a run under `--mixed_precision bf16` (fp16)
    # runs its live bottom under autocast, so its cache is built under the same autocast
    # and holds what the live bottom would compute (tests/test_cached_equals_live.py).
    compute_dtype: str = "float32"
    # The frozen depths of the plan's earlier stages (between 0 and frozen_layers): a
    # 16-bit store's rows are rounded to its dtype there (`frozen_output`).
    round_at: tuple[int, ...] = ()
    chunks_per_shard: int | None = None  # None: derived (storage/spec.py); write-through: 1
    # 0: every row computed at seq_len. N: each row at its real length rounded up to a
    # multiple of N, zeros beyond (padded classification rows, `by_row_length`).
    length_multiple: int = 0
    # fsspec options of `url` (endpoint, credentials): used, never recorded
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def store_fingerprint(model: BertForMaskedLM, req: CacheRequest) -> dict[str, str]:
    """What a store's contents are a function of; any difference makes it stale."""
    return {
        "weights": bottom_fingerprint(model, req.frozen_layers),
        "frozen_layers": str(req.frozen_layers),
        "data": req.data_fingerprint,
        "mask_seed": str(req.mask_seed),
        "dtype": req.dtype,
        "seq_len": str(req.seq_len),
        "num_rows": str(req.num_rows),
        # absent for float32, so stores built before this key existed stay valid
        **({"compute_dtype": req.compute_dtype} if req.compute_dtype != "float32" else {}),
        # absent where rounding changes nothing (float32, or no earlier boundary)
        **({"rounded_at": ",".join(map(str, cuts))} if (cuts := rounding_cuts(req)) else {}),
        **({"length_multiple": str(req.length_multiple)} if req.length_multiple else {}),
    }


def rounding_cuts(req: CacheRequest) -> tuple[int, ...]:
    """The depths below the store's own at which its rows are rounded to its dtype."""
    if req.dtype == "float32":
        return ()
    return tuple(sorted(b for b in set(req.round_at) if 0 < b < req.frozen_layers))


def by_row_length(
    fn: Callable[..., torch.Tensor], attention_mask: torch.Tensor, multiple: int, **columns
) -> torch.Tensor:
    """`fn(attention_mask, **columns)` run once per group of rows of one computed length
    (the row's real tokens rounded up to `multiple`, at most its width), on the columns cut
    to it; the outputs back in row order, zeros beyond each row's length. Rows are padded
    on the right, as `padded_columns` (cached_mslt/evaluation/task_store.py) pads them.

    Padded rows (a classification task's, padded to its longest) then cost their own
    length, not the longest's. A row's length is its own, never its batch's, because sdpa
    can round a row differently at another padded length (docs/library-facts.md): every
    path that computes a row this way gets the same bytes, whatever rows share its batch."""
    real = attention_mask.sum(1).clamp(min=1)
    lengths = (-(-real // multiple) * multiple).clamp(max=attention_mask.shape[1])
    out = None
    for length in lengths.unique().tolist():
        rows = (lengths == length).nonzero().squeeze(1)
        cut = {k: v[rows, :length] for k, v in columns.items() if v is not None}
        part = fn(attention_mask[rows, :length], **cut)
        if out is None:
            out = part.new_zeros((len(lengths), attention_mask.shape[1], *part.shape[2:]))
        out[rows, :length] = part
    return out


def frozen_output(
    model: BertForMaskedLM,
    attention_mask: torch.Tensor | None,
    *,
    stop: int,
    dtype: torch.dtype | str,
    round_at: tuple[int, ...] = (),
    input_ids: torch.Tensor | None = None,
    previous: torch.Tensor | None = None,
    start: int = 0,
    length_multiple: int = 0,
) -> torch.Tensor:
    """A store's entry for some rows: the frozen bottom's output at depth `stop`, from the
    token ids (`start` 0) or from `previous`, the rows' entry at depth `start` in an
    earlier store, rounded to `dtype` at each depth of `round_at` on the way and at the
    end. Rounding where an earlier store rounded makes every path (full, incremental,
    write-through from any depth) give the same bytes (docs/design.md, invariant 9).
    `length_multiple`: each row computed at its own length (`by_row_length`)."""
    if length_multiple:

        def rows_at_length(mask, input_ids=None, previous=None):
            return frozen_output(
                model, mask, stop=stop, dtype=dtype, round_at=round_at,
                input_ids=input_ids, previous=previous, start=start,
            )  # fmt: skip

        return by_row_length(
            rows_at_length, attention_mask, length_multiple, input_ids=input_ids, previous=previous
        )
    hidden, depth = previous, start
    for cut in [*(b for b in round_at if start < b < stop), stop]:
        if hidden is None:
            hidden = bottom_forward(model, input_ids, attention_mask, cut)
        else:  # a stored entry: widened, as the frozen layers compute in float32
            hidden = run_layers(model, hidden.to(torch.float32), attention_mask, depth, cut)
        hidden, depth = round_to_store(hidden, dtype), cut  # int8: encoded and decoded
    return hidden


def open_valid_store(
    url: str, fingerprint: dict[str, str], storage_options: dict[str, Any] | None = None
) -> ActivationStore | None:
    """The store at `url` if it is complete and matches; None if there is none or it is
    incomplete (a build resumes it); StaleStoreError if it holds something else."""
    try:
        return ActivationStore.open(
            url, expected_fingerprint=fingerprint, storage_options=storage_options
        )
    except (StoreNotFoundError, IncompleteStoreError):  # the builder creates or resumes it
        return None


def _unfinished_build(req: CacheRequest, options: dict[str, Any]) -> ActivationStore | None:
    """The incomplete store at `req.url`; None if there is none."""
    try:
        store = ActivationStore.open(req.url, require_complete=False, storage_options=options)
        return None if store.is_complete else store
    except StoreError:
        return None


def _resumed_layout(spec: StoreSpec, unfinished: ActivationStore | None) -> StoreSpec:
    """`spec`, with the shard layout of the unfinished build it resumes: a store started
    under another derived default (storage/spec.py MIN_SHARDS) is finished in its own
    layout rather than refused. Anything else that differs still refuses the resume."""
    if unfinished is None:
        return spec
    recorded = unfinished.spec
    same = {k: v for k, v in spec.to_dict().items() if k != "chunks_per_shard"}
    if same != {k: v for k, v in recorded.to_dict().items() if k != "chunks_per_shard"}:
        return spec
    return StoreSpec(**{**same, "chunks_per_shard": recorded.chunks_per_shard})


@torch.no_grad()
def build_cache(
    model: BertForMaskedLM,
    req: CacheRequest,
    prepared_train,
    *,
    source: ActivationStore | None = None,
    overwrite: bool = False,
    batch_rows: int = 64,
) -> tuple[ActivationStore, dict]:
    """Build (or resume, or reuse) the store for `req` on every process; returns the
    complete store, opened read-only, and build statistics.

    `source`: the previous stage's store (incremental rebuild); None builds from token ids.
    """
    # Under `accelerate launch` on CPUs only Accelerator() reads ACCELERATE_USE_CPU; a bare
    # PartialState() created first would see one process. The state is a singleton, so an
    # existing Accelerator's wins.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    fingerprint = store_fingerprint(model, req)
    options = req.storage_options
    existing = open_valid_store(req.url, fingerprint, options) if not overwrite else None
    state.wait_for_everyone()
    if existing is not None:
        return existing, {"reused": True, "build_s": 0.0, "rows": 0}
    assert req.frozen_layers > 0, "a cache needs at least one frozen module"
    how = _build_kind(req, source)
    store = _open_for_build(state, model, req, fingerprint, how, source, overwrite)
    for m in frozen_modules(model, req.frozen_layers):
        m.to(state.device).eval()
    pending = store.pending_shards(state.process_index, state.num_processes)
    rows_total = sum(store.shard_rows(s)[1] - store.shard_rows(s)[0] for s in pending)
    bar = tqdm(
        total=rows_total,
        desc=f"cache stage-{req.stage} ({how.split(' ')[0]})",
        unit="row",
        disable=not state.is_local_main_process,
    )
    began = time.perf_counter()
    prepared = PreparedBlocks(prepared_train, block_rows=batch_rows, num_rows=req.num_rows)
    try:
        _build_shards(model, req, store, pending, prepared, source, state.device, bar)
    except BaseException:
        # A failed build gives up its lock at once (a rerun in this process, or another
        # job, resumes it); a killed one leaves it for stale-lock takeover.
        if state.is_main_process:
            store.release_lock()
        raise
    bar.close()
    elapsed = time.perf_counter() - began
    return _commit(state, store, req, fingerprint, how, rows_total, elapsed)


def open_write_through(
    model: BertForMaskedLM, req: CacheRequest, *, overwrite: bool = False
) -> ActivationStore:
    """The store a write-through stage fills, on every process: a complete one that
    matches as it is (every row is read back), else created, or resumed with the units it
    holds (docs/cache-format.md, write-through). Process 0 holds the build lock until the
    stage ends (cached_mslt/stages/runner.py: finish_write_through)."""
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    req = replace(req, chunks_per_shard=1)  # a unit is one loader block
    fingerprint = store_fingerprint(model, req)
    existing = (
        open_valid_store(req.url, fingerprint, req.storage_options) if not overwrite else None
    )
    state.wait_for_everyone()
    if existing is not None:
        return existing
    return _open_for_build(state, model, req, fingerprint, WRITE_THROUGH, None, overwrite)


def _build_kind(req: CacheRequest, source: ActivationStore | None) -> str:
    """How the store is built: "full", or "incremental from <source> (layers a..b)"."""
    if source is None:
        return "full"
    start_layer = int(source.fingerprint["frozen_layers"])
    if source.spec.num_rows != req.num_rows or source.spec.seq_len != req.seq_len:
        raise ValueError(
            f"incremental rebuild needs the previous store to hold the same rows: it has "
            f"{source.spec.num_rows}x{source.spec.seq_len}, this stage needs "
            f"{req.num_rows}x{req.seq_len}; use --cache_rebuild full"
        )
    return f"incremental from {source.url} (layers {start_layer}..{req.frozen_layers})"


def _open_for_build(state, model, req, fingerprint, how, source, overwrite) -> ActivationStore:
    """Process 0 creates the store (or reopens a half-built one to resume) and holds its
    build lock until commit; the others join once it exists."""
    options = req.storage_options
    spec = StoreSpec(
        num_rows=req.num_rows,
        seq_len=req.seq_len,
        hidden_size=model.config.hidden_size,
        dtype=req.dtype,
        codec=req.codec,
        rows_per_chunk=req.rows_per_chunk,
        chunks_per_shard=req.chunks_per_shard,
    )
    attrs = {
        "stage": req.stage,
        "frozen_layers": req.frozen_layers,
        "masking_seed": req.mask_seed,
        "built": how,
        "source_store": source.url if source else None,
    }
    # A half-built store made another way (incremental vs full, another source) is not
    # resumed: its shards would mix two builds and its attributes would describe the other.
    if state.is_main_process and not overwrite:
        unfinished = _unfinished_build(req, options)
        if unfinished is not None and unfinished.attrs.get("built") not in (None, how):
            overwrite = True
        else:
            spec = _resumed_layout(spec, unfinished)
    if state.is_main_process:
        store = ActivationStore.create(
            req.url,
            spec,
            fingerprint=fingerprint,
            attrs=attrs,
            overwrite=overwrite,
            storage_options=options,
        )
    state.wait_for_everyone()
    if not state.is_main_process:
        store = ActivationStore.open(
            req.url, mode="r+", require_complete=False, storage_options=options
        )
    return store


def _build_shards(model, req, store, pending, prepared, source, device, bar) -> None:
    """Compute and write the pending shards, the source read ahead and each shard written
    on a background thread while the next one is computed (cached_mslt/stages/background.py)."""
    start_layer = int(source.fingerprint["frozen_layers"]) if source is not None else 0
    writer = ShardWriter(store)
    batches = read_ahead(_input_batches(store, pending, prepared, source))
    try:
        dtype = store.spec.rounding
        for shard, rows in _shard_rows(model, req, batches, start_layer, dtype, device, bar):
            writer.put(shard, rows)
    finally:
        batches.close()  # stops the reader
        writer.close(raise_error=False)  # nothing may write once the lock is released
    writer.close()  # a failed write raises here


def _input_batches(store, pending, prepared, source) -> Iterator[tuple[int, int, int, dict]]:
    """(shard, a, b, rows) for every batch of rows [a, b) of the pending shards, in order:
    the prepared rows and, for an incremental build, the source store's hidden states."""
    for shard in pending:
        lo, hi = store.shard_rows(shard)
        for a in range(lo, hi, prepared.block_rows):
            b = min(a + prepared.block_rows, hi)
            rows = prepared.rows(a, b)
            if source is not None:
                rows["previous"] = source.read_hidden(a, b)
            yield shard, a, hi, rows


def _shard_rows(model, req, batches, start_layer, dtype, device, bar) -> Iterator[tuple[int, dict]]:
    """Each shard's rows, once its last batch is computed: the frozen bottom's output (from
    token ids, or the source store's hidden states pushed through the newly frozen layers)
    and what training reads beside it."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in SHARD_ARRAYS}
    compute = getattr(torch, req.compute_dtype)
    autocast = torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32)
    cuts = rounding_cuts(req)
    for shard, a, hi, rows in batches:
        mask = rows["attention_mask"].to(device)
        with autocast:  # as the trainer runs a live bottom (trainer._phase_inputs)
            if "previous" not in rows:
                inputs = {"input_ids": rows["input_ids"].to(device)}
            else:
                inputs = {"previous": rows["previous"].to(device), "start": start_layer}
            hidden = frozen_output(
                model, mask, stop=req.frozen_layers, dtype=dtype, round_at=cuts,
                length_multiple=req.length_multiple, **inputs,
            )  # fmt: skip
        parts["hidden"].append(hidden.cpu())
        parts["attention_mask"].append(rows["attention_mask"].to(torch.uint8))
        parts["labels"].append(rows["labels"].to(torch.int32))
        parts["row_index"].append(rows["row_index"])
        b = a + len(rows["row_index"])
        bar.update(b - a)
        if b == hi:
            yield shard, {k: torch.cat(v) for k, v in parts.items()}
            parts = {k: [] for k in SHARD_ARRAYS}


def _commit(state, store, req, fingerprint, how, rows_total: int, elapsed: float) -> tuple:
    """Every process has written its shards: process 0 checks and commits, then all open
    the complete store read-only."""
    state.wait_for_everyone()
    if state.is_main_process:
        store.commit()
    state.wait_for_everyone()
    built = ActivationStore.open(
        req.url, expected_fingerprint=fingerprint, storage_options=req.storage_options
    )
    stats = build_stats(state, rows_total, elapsed, how, built.spec.num_rows)
    state.print(build_line(req, stats))
    return built, stats


def build_stats(state, rows: int, elapsed: float, how: str, store_rows: int) -> dict[str, Any]:
    """What this build computed, over every process: `rows` is the total this build wrote
    (less than the store holds when it resumed a build), `rows_per_process` each share."""
    per_process = [int(n) for n in gather_object([rows])]
    total = sum(per_process)
    return {
        "reused": False,
        "build_s": elapsed,
        "rows": total,
        "rows_per_process": per_process,
        "store_rows": store_rows,
        "rows_per_s_per_process": total / len(per_process) / elapsed if elapsed > 0 else None,
        "how": how,
    }


def build_line(req: CacheRequest, stats: dict[str, Any]) -> str:
    """The build's log line: rows in total and per process, and the store's size."""
    shares = ", ".join(f"{n}" for n in stats["rows_per_process"])
    rate = stats["rows_per_s_per_process"] or 0.0
    return (
        f"cache stage-{req.stage}: built {stats['rows']} rows on {len(stats['rows_per_process'])} "
        f"process(es) ({shares}) in {stats['build_s']:.1f}s ({rate * req.seq_len:,.0f} tokens/s "
        f"per process); the store holds {stats['store_rows']} rows; {stats['how']}"
    )
