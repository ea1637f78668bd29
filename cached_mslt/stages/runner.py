"""Running MSLT stages: grow, freeze, cache, train, save. One call per stage.

The run directory (default runs/<preset>/) is laid out as `cached_mslt.rundir` says.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from transformers import BertForMaskedLM

from cached_mslt import __version__
from cached_mslt.config import ConfigError, RunArgs
from cached_mslt.data import (
    DataError,
    PreparedBlocks,
    PreparedData,
    check_prepared,
    load_prepared,
)
from cached_mslt.models import (
    bottom_fingerprint,
    build_model,
    check_tied,
    grow,
    model_fingerprint,
    set_dropout,
)
from cached_mslt.rundir import (
    DiskFullError,
    RunLayout,
    RunLockedError,
    saving,
    stage_lock,
    write_atomic,
)
from cached_mslt.stages.cache import CacheRequest, build_cache, open_write_through
from cached_mslt.stages.cache_choice import MODES, Stored, choose_cache
from cached_mslt.stages.contract import (
    StageError,
    check_cache_location,
    check_previous_stage_done,
    check_run_config,
    check_same_data,
    check_saved_model,
)
from cached_mslt.stages.fixes import divergence_fix, repair_command, store_repair_hint
from cached_mslt.stages.measured import (
    cost_record,
    predicted,
    previous_rate,
    priced_at,
    probe_compute,
    store_bandwidth,
)
from cached_mslt.stages.plan import Stage, StagePlan
from cached_mslt.stages.precision import (
    autocast_dtype,
    check_precision_supported,
    effective_precision,
    on_cuda,
    requested_precision,
)
from cached_mslt.stages.summary import record_peak, write_run_summary
from cached_mslt.stages.write_through import (
    Pending,
    Source,
    UnitWriter,
    WriteThrough,
    WriteThroughBlocks,
)
from cached_mslt.training import (
    MIN_TRAINED_SHARE,
    DivergenceError,
    MetricsWriter,
    OldCheckpointError,
    Phase,
    PhaseShare,
    RunClock,
    Stopwatch,
    clock_fields,
    keep_freed_memory,
    layer_forward_flops,
    share_of_flops,
    step_flops,
    train_phase,
)
from storage import (
    ActivationStore,
    BlockDataset,
    Blocks,
    StoreError,
)

logger = logging.getLogger(__name__)

UNBOUNDED_STEPS = 2**62


# Refusals whose message already says what was expected, what was found and what to run:
# entry points print them as one line of text, not a traceback.
USER_ERRORS = (
    ConfigError,
    DataError,
    StageError,
    StoreError,
    RunLockedError,
    DiskFullError,
    OldCheckpointError,
)


def block_rows_for(batch_size: int, chosen: int | None = None) -> int:
    """Rows per store chunk (and per loader block): `chosen` (`--block_rows`, a divisor of
    the batch size), else the largest divisor of the batch size up to 8, so a batch is
    whole blocks from several random places (the shuffle window)."""
    if chosen is not None:
        return chosen
    return max(d for d in range(1, min(batch_size, 8) + 1) if batch_size % d == 0)


def run_block_rows(args: RunArgs) -> int:
    """The run's rows per store chunk, write-through unit and loader block."""
    return block_rows_for(args.train.batch_size, args.train.block_rows)


def train_rows(args: RunArgs, available: int) -> int:
    """How many prepared training examples a run uses (0 or None: all of them)."""
    return min(args.data.train_examples or available, available)


def rows_per_step(args: RunArgs, world_size: int) -> int:
    """Sequences one optimizer step consumes across all processes (the global batch)."""
    return args.train.batch_size * world_size * args.train.gradient_accumulation_steps


def steps_for(stage: Stage, args: RunArgs, world_size: int) -> int:
    if stage.steps is not None:
        return stage.steps
    return max(1, math.ceil(stage.tokens / (rows_per_step(args, world_size) * args.data.seq_len)))


def load_stage_model(args: RunArgs, stage: Stage, vocab_size: int) -> BertForMaskedLM:
    """Stage 1 starts from a fresh model; stage K from stage K-1's checkpoint, grown. Either
    way at the stage's dropout, if the plan sets one."""
    if stage.index == 1:
        model = build_model(args.model, vocab_size, stage.num_layers, seed=args.train.seed)
    else:
        model = _grown_previous_model(args, stage)
    if stage.dropout is not None:
        set_dropout(model, stage.dropout)
    return model


def _grown_previous_model(args: RunArgs, stage: Stage) -> BertForMaskedLM:
    check_previous_stage_done(args, stage)  # callers other than run_stage too
    layout = RunLayout.of(args)
    model = BertForMaskedLM.from_pretrained(
        layout.model_dir(stage.index - 1), attn_implementation=args.model.attn_implementation
    )
    check_saved_model(args, stage.index - 1, model)
    if model.config.num_hidden_layers != stage.frozen_layers and not stage.joint:
        raise StageError(
            f"stage {stage.index - 1} saved a {model.config.num_hidden_layers}-layer model but this "
            f"plan expects {stage.frozen_layers}; the stage plan changed between stages"
        )
    if stage.num_layers > model.config.num_hidden_layers:
        grow(model, stage.num_layers, init=args.schedule.growth_init)
    return model


def run_stage(
    args: RunArgs,
    index: int,
    accelerator: Accelerator | None = None,
    extra: dict[str, Any] | None = None,
    share: PhaseShare | None = None,
    rebuild_cache: bool = False,
) -> dict[str, Any]:
    """Run stage `index` of the plan: nothing if it is done, resume if it was interrupted.
    `extra` is added to every metrics line (the comparison harness adds `method`). With
    `share`, the stage trains until that share of a comparison's budget is spent. With
    `rebuild_cache`, the stage's store is built anew: a finished stage rebuilds only its
    store (from its saved model, whose bottom is the frozen bottom it trained on)."""
    plan = StagePlan.from_args(args)
    stage = plan[index]
    check_prepared(args.data)  # data settings first: nothing written for a mismatched run
    check_previous_stage_done(args, stage)
    check_cache_location(args, plan)
    accelerator = accelerator or make_accelerator(args)
    # One owner per run and stage, from before it reads its own state to its manifest.
    where = f"{stage.name} of {args.train.run_dir}"
    with stage_lock(accelerator, RunLayout.of(args).lock(index), where):
        return _run_stage_locked(args, index, plan, stage, accelerator, extra, share, rebuild_cache)


@dataclass
class _StageRun:
    """One stage being run: its place in the plan and what it has loaded so far."""

    args: RunArgs
    plan: StagePlan
    stage: Stage
    accelerator: Accelerator
    data: PreparedData
    clock: RunClock
    model: BertForMaskedLM
    bottom_before: str  # the frozen bottom's fingerprint before training
    tokenizer: Any  # saved with every checkpoint: the ids are its ids
    previous: dict[str, Any] | None = None  # the previous stage's manifest
    prediction: dict[str, Any] = field(default_factory=dict)  # mode -> the cost model's
    bandwidth: dict[str, float] | None = None  # the store location's, as probed

    @property
    def index(self) -> int:
        return self.stage.index

    @property
    def layout(self) -> RunLayout:
        return RunLayout.of(self.args)

    def steps(self, stage: Stage) -> int:
        return steps_for(stage, self.args, self.accelerator.num_processes)


def _run_stage_locked(
    args: RunArgs,
    index: int,
    plan: StagePlan,
    stage: Stage,
    accelerator: Accelerator,
    extra: dict[str, Any] | None,
    share: PhaseShare | None,
    rebuild_cache: bool,
) -> dict[str, Any]:
    check_run_config(args, accelerator)
    layout = RunLayout.of(args)
    done = layout.read_manifest(index)
    if done is not None and rebuild_cache:
        return rebuild_stage_store(args, index, stage, accelerator, done)
    if done is not None:
        accelerator.print(f"{stage.name}: already done ({layout.manifest(index)}), skipping")
        return done
    run = _start_stage(args, plan, stage, accelerator)
    start = run.clock.to_dict()
    mode, why, sources = _choose_mode(run)
    mode, why, over_share = fit_build_to_share(run, mode, why, sources, share)
    blocks, build, fill = _stage_blocks(run, mode, sources, rebuild_cache)
    build = record_build(run, mode == "eager", build, over_share, share, extra)
    phase = _stage_phase(run, blocks, mode, fill, share, extra)
    before_training = run.clock.to_dict()
    with abandon_on_failure(run, fill):
        stats = _train_stage(run, phase)
    if fill is not None:
        build = {**build, **finish_write_through(run, fill)}
    manifest = _stage_manifest(run, mode, why, build, stats)
    manifest["cost_model"] = cost_record(
        run.prediction.get(mode),
        start,
        before_training,
        run.clock.to_dict(),
        stats,
        accelerator.num_processes,
        run.bandwidth,
    )
    save_stage(accelerator, run.model, run.tokenizer, layout, index, manifest)
    return manifest


def _start_stage(
    args: RunArgs, plan: StagePlan, stage: Stage, accelerator: Accelerator
) -> _StageRun:
    """Load the data, the run's clock so far and the stage's starting model."""
    index = stage.index
    data = load_prepared(args.data.prepared_dir, args.data)
    tokenizer = data.tokenizer()
    previous = RunLayout.of(args).read_manifest(index - 1) if index > 1 else None
    check_same_data(args, index, previous, data.manifest["fingerprint"])
    clock = RunClock(**previous["clock"]) if previous else RunClock()
    set_seed(args.train.seed + index)  # a stage's randomness does not depend on how it was launched
    model = load_stage_model(args, stage, data.manifest["vocab_size"])
    bottom = bottom_fingerprint(model, stage.frozen_layers)
    return _StageRun(
        args, plan, stage, accelerator, data, clock, model, bottom, tokenizer, previous
    )


def _choose_mode(run: _StageRun) -> tuple[str, str, list[ActivationStore]]:
    """live, eager or write-through (and why), and the earlier stores of the run the stage
    can start from: an eager build from the previous one if complete, write-through from
    the deepest that holds each row."""
    args, stage, world = run.args, run.stage, run.accelerator.num_processes
    incremental = args.schedule.cache_rebuild == "incremental"
    sources = earlier_stores(args, stage, run.model) if incremental else []
    rows = train_rows(args, len(run.data.train))
    stored = [Stored(int(s.fingerprint["frozen_layers"]), _held(s)) for s in sources]
    compute, source = previous_rate(run.previous, world), "the previous stage"
    if compute is None and stage.frozen_layers:  # stage 2, or after a stage that measured none
        batch = run.data.train[: args.train.batch_size]
        compute = probe_compute(run.model, stage.frozen_layers, batch, run.accelerator)
        source = "a probe of this stage's top and bottom"
    priced = priced_at(args, compute, world)
    if priced is not None and stage.frozen_layers and stage.cache != "never":
        run.bandwidth = store_bandwidth(
            run.layout.probe_url(),
            run_block_rows(args) * round(priced[0].row_bytes),
            run.accelerator,
            args.schedule.storage_options(),
        )
        cuda = run.accelerator.device.type == "cuda"  # a GPU's loader and writer overlap I/O
        priced = priced_at(args, compute, world, run.bandwidth, overlap=cuda)
    reads = lambda s: run.steps(s) * rows_per_step(args, world)  # noqa: E731
    mode, why = choose_cache(run.plan, stage, rows, reads, stored, priced)
    for m in MODES if stage.frozen_layers else ("live",):
        run.prediction[m] = predicted(priced, m, stage, rows, reads(stage), stored, source)
    run.accelerator.print(
        f"{stage.name}: {stage.num_layers} layers, {stage.frozen_layers} frozen, "
        f"{run.steps(stage)} steps; {mode} ({why})"
    )
    return mode, why, sources


def _held(store: ActivationStore) -> float:
    return 1.0 if store.is_complete else len(store.shards_done()) / store.num_shards


def _stage_blocks(
    run: _StageRun, mode: str, sources: list[ActivationStore], rebuild_cache: bool
) -> tuple[Blocks, dict[str, Any], WriteThrough | None]:
    """What the stage reads: the token ids (live), its store (eager: built, resumed or
    reused here), or both (write-through: the store is filled by the steps)."""
    args, stage = run.args, run.stage
    rows = train_rows(args, len(run.data.train))
    block_rows = run_block_rows(args)
    prepared = PreparedBlocks(run.data.train, block_rows=block_rows, num_rows=rows)
    if mode == "live":
        return prepared, {"build_s": 0.0, "reused": False}, None
    overwrite = args.schedule.overwrite_cache or rebuild_cache
    req = cache_request(
        args, run.index, stage, run.data, rows, run.plan, run.accelerator.mixed_precision
    )
    if mode == "write-through":
        with store_repair_hint(args, run.index, None):
            store = open_write_through(run.model, req, overwrite=overwrite)
        pending = Pending()
        blocks = WriteThroughBlocks(prepared, store, [Source.of(s) for s in sources], pending)
        fill = WriteThrough(run.model, blocks, UnitWriter(store, pending), req.round_at)
        return blocks, {"build_s": 0.0, "reused": False, "how": "write-through"}, fill
    source = next((s for s in sources if s.is_complete), None)  # the deepest complete one
    watch = Stopwatch(run.clock)
    with store_repair_hint(args, run.index, source):
        store, build = build_cache(
            run.model, req, run.data.train, source=source, overwrite=overwrite
        )
    # Every process waited for the slowest at the build's barriers: charge that wall time.
    watch.tick()
    run.clock.flops += build_flops(run.model.config, args.data.seq_len, build, stage, source)
    return BlockDataset(store, block_rows=block_rows), build, None


@contextmanager
def abandon_on_failure(run: _StageRun, fill: WriteThrough | None) -> Iterator[None]:
    """A write-through stage that fails writes what it queued (whole units, each a pure
    function of its row) and gives up the store's lock, so a rerun resumes at once; a
    killed one leaves the lock to stale-lock takeover and its units to the markers."""
    try:
        yield
    except BaseException:
        if fill is not None:
            fill.writer.close(raise_error=False)
            if run.accelerator.is_main_process:
                fill.blocks.store.release_lock()
        raise


def finish_write_through(run: _StageRun, fill: WriteThrough) -> dict[str, Any]:
    """After the last step: every queued unit written, then (all processes done) rank 0
    commits the store if every unit is there, and gives up its lock either way: a store
    that holds the rows the stage read is a finished write-through store. The counts are
    summed over processes (`*_per_process` keeps each share)."""
    fill.writer.close()
    mine = fill.stats()
    shares = gather_object([mine])
    stats = {k: sum(s[k] for s in shares) for k in mine}
    stats |= {f"{k}_per_process": [s[k] for s in shares] for k in ("units_computed", "units_read")}
    store = fill.blocks.store
    held = len(store.shards_done())
    if run.accelerator.is_main_process:
        if held == store.num_shards:
            store.commit()
        else:
            store.release_lock()
    run.accelerator.wait_for_everyone()
    run.accelerator.print(
        f"{run.stage.name}: write-through computed {stats['units_computed']} blocks and read "
        f"{stats['units_read']} back on {len(shares)} process(es); the store holds "
        f"{held}/{store.num_shards} blocks of {fill.blocks.block_rows} rows"
    )
    return {**stats, "units_held": held, "units": store.num_shards}


def fit_build_to_share(
    run: _StageRun,
    mode: str,
    why: str,
    sources: list[ActivationStore],
    share: PhaseShare | None,
) -> tuple[str, str, dict[str, Any] | None]:
    """Under a share of a comparison's budget, a store build the cost model says would
    leave the stage less than MIN_TRAINED_SHARE of its share to train on is not started:
    the stage runs live (`--cache_over_share live`, the default) and says why; the third
    value is that verdict (None when the chosen mode stands). Builds count at the cost
    model's forward FLOPs (`build_flops`), in seconds at the run's rate so far
    (`share_of_flops`). `--cache_over_share build` keeps the eager build."""
    if mode != "eager" or share is None or run.args.schedule.cache_over_share == "build":
        return mode, why, None  # write-through has no build to fit: it costs at most live
    source = next((s for s in sources if s.is_complete), None)  # what the build starts from
    rows = train_rows(run.args, len(run.data.train))
    flops = build_flops(run.model.config, run.args.data.seq_len, {"rows": rows}, run.stage, source)
    cost = share_of_flops(share.budget, run.clock, flops)
    # share.end and the clock read from the previous manifest are the same on every rank,
    # so every rank takes the same decision.
    room = share.end - share.budget.spent(run.clock)
    if cost <= (1.0 - MIN_TRAINED_SHARE) * room:
        return mode, why, None
    part = f"{cost / room:.0%}" if room > 0 else "more than all"
    verdict = {
        "build_flops": flops,
        "build_share": cost / room if room > 0 else None,
        "reason": f"its store build would spend {part} of its share, leaving less than "
        f"{MIN_TRAINED_SHARE:.0%} to train on",
    }
    run.accelerator.print(f"{run.stage.name}: live instead: {verdict['reason']}")
    return "live", f"live under the budget: {verdict['reason']} (was {why})", verdict


def record_build(
    run: _StageRun,
    cached: bool,
    build: dict[str, Any],
    over_share: dict[str, Any] | None,
    share: PhaseShare | None,
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    """Under a share, where the stage's training starts on the clock (`clock_after` in the
    manifest's `cache`, the budget rule's verdict beside it) and, after a build, a
    metrics line on the clock at the build's end: a comparison's curves and tables then
    count the build whether or not a training step follows."""
    if share is None:
        return build
    build = {**build, "clock_after": run.clock.to_dict()}
    if over_share is not None:
        build["live_under_budget"] = over_share
    if cached:
        line = {**clock_fields(run.clock), "event": "cache_build", "build_s": build["build_s"]}
        line.update(stage=run.stage.name, **(extra or {}))
        MetricsWriter(run.args.train.run_dir, run.accelerator).log(line)
    return build


def lr_span(run: _StageRun, share: PhaseShare | None) -> tuple[float, float]:
    """The part of the learning-rate curve a stage covers. `--lr_scope stage`: all of its
    own. `run`: its place in the whole plan, by planned steps (under a comparison's budget,
    its share of the budget), so the run warms up once and decays once and a grown stage
    starts at the rate the previous one ended at (docs/levers.md, the schedule across
    stages)."""
    if run.args.schedule.lr_scope != "run":
        return (0.0, 1.0)
    if share is not None:
        return (share.start, share.end)
    steps = [run.steps(s) for s in run.plan.stages]
    before = sum(steps[: run.index - 1])
    return (before / sum(steps), (before + steps[run.index - 1]) / sum(steps))


def _stage_phase(
    run: _StageRun,
    blocks: Blocks,
    mode: str,
    fill: WriteThrough | None,
    share: PhaseShare | None,
    extra: dict[str, Any] | None,
) -> Phase:
    args, stage, config = run.args, run.stage, run.model.config
    trained = stage.num_layers - stage.frozen_layers
    frozen_live = stage.frozen_layers if mode == "live" else 0
    per_frozen_token = layer_forward_flops(config, args.data.seq_len)
    return Phase(
        name=stage.name,
        model=run.model,
        frozen_layers=stage.frozen_layers,
        # Under a share of a budget the share ends the stage; the plan's steps only
        # informed the cache decision.
        steps=run.steps(stage) if share is None else UNBOUNDED_STEPS,
        blocks=blocks,
        cached=mode == "eager",
        fill=fill,
        learning_rate=args.train.learning_rate,
        warmup_fraction=args.schedule.warmup_fraction,
        share=share,
        lr_schedule=args.schedule.lr_schedule,
        decay_fraction=args.schedule.decay_fraction,
        lr_span=lr_span(run, share),
        # `fresh`: each stage its own shuffle, so a grown stage reads rows the stage before
        # did not (docs/levers.md, growth that pays); `same`: the rows the previous store holds.
        data_seed=args.train.seed + run.index - 1 if args.schedule.stage_order == "fresh" else None,
        checkpoint_dir=run.layout.checkpoint_dir(run.index),
        flops_per_step=lambda c: (
            step_flops(
                config,
                tokens=c["tokens"],
                masked_tokens=c["masked"],
                trained_layers=trained,
                frozen_live_layers=frozen_live,
                seq_len=args.data.seq_len,
                decoder_weight_trains=stage.frozen_layers == 0,
            )
            # write-through: the frozen forwards of the rows its store lacked
            + c.get("frozen_layer_tokens", 0) * per_frozen_token
        ),
        extra=dict(extra or {}),
    )


def _train_stage(run: _StageRun, phase: Phase) -> dict[str, Any]:
    args = run.args
    metrics = MetricsWriter(args.train.run_dir, run.accelerator)
    try:
        with store_repair_hint(args, run.index, None):
            return train_phase(run.accelerator, phase, args, run.clock, metrics, run.data.valid)
    except DivergenceError as e:
        # The saved optimizer state carries the old learning rate: resume cannot lower it.
        raise StageError(f"{e}\n{divergence_fix(run.args, run.index, phase.checkpoint_dir)}") from e


# manifest "mode" of each cache mode ("cached": an eager build, the name stores have had)
MANIFEST_MODES = {"live": "live", "eager": "cached", "write-through": "write-through"}
STORE_MODES = ("cached", "write-through")  # manifest modes whose stage has a store


def _stage_manifest(
    run: _StageRun, mode: str, why: str, build: dict[str, Any], stats: dict[str, Any]
) -> dict[str, Any]:
    """The record of a finished stage, after checking its frozen bottom did not move."""
    stage = run.stage
    bottom_after = bottom_fingerprint(run.model, stage.frozen_layers)
    if bottom_after != run.bottom_before:
        raise StageError(f"{stage.name}: the frozen bottom changed during training; this is a bug")
    check_tied(run.model)
    return {
        "stage": stage.to_dict(),
        "plan": run.plan.to_list(),
        "mode": MANIFEST_MODES[mode],
        "cache_decision": why,
        "cache": {**build, "url": run.layout.store_url(run.index) if mode != "live" else None},
        "fingerprints": {
            "frozen_bottom": bottom_after,
            "model": model_fingerprint(run.model),  # what save_stage writes: checked on load
            "data": run.data.manifest["fingerprint"],
        },
        "timings": {"build_s": build.get("build_s", 0.0), "train_s": stats["train_s"]},
        "train": stats,
        "clock": run.clock.to_dict(),
        "num_processes": run.accelerator.num_processes,
        "mixed_precision": run.accelerator.mixed_precision,  # the launcher's or --mixed_precision
        "version": __version__,
    }


def cache_request(
    args: RunArgs,
    index: int,
    stage: Stage,
    data,
    rows: int,
    plan: StagePlan,
    mixed_precision: str,
) -> CacheRequest:
    """What stage `index`'s store holds; `mixed_precision` is the run's Accelerator's (the
    launcher's or --mixed_precision), so the build computes as the live bottom would."""
    return CacheRequest(
        url=RunLayout.of(args).store_url(index),
        frozen_layers=stage.frozen_layers,
        dtype=args.schedule.cache_dtype,
        codec=args.schedule.cache_codec,
        rows_per_chunk=run_block_rows(args),
        data_fingerprint=data.manifest["fingerprint"],
        mask_seed=data.manifest["mask_seed"],
        seq_len=args.data.seq_len,
        num_rows=rows,
        stage=index,
        compute_dtype=autocast_dtype(mixed_precision),
        storage_options=args.schedule.storage_options(),
        round_at=tuple(s.frozen_layers for s in plan.stages if s.index < index and not s.joint),
    )


def rebuild_stage_store(
    args: RunArgs, index: int, stage: Stage, accelerator: Accelerator, manifest: dict
) -> dict[str, Any]:
    """Rebuild a finished stage's store in full; its training is untouched."""
    if manifest["mode"] not in STORE_MODES:
        accelerator.print(f"{stage.name}: trained live, it has no store to rebuild")
        return manifest
    data = load_prepared(args.data.prepared_dir, args.data)
    model = BertForMaskedLM.from_pretrained(
        RunLayout.of(args).model_dir(index), attn_implementation=args.model.attn_implementation
    )
    bottom = bottom_fingerprint(model, stage.frozen_layers)
    if bottom != manifest["fingerprints"]["frozen_bottom"]:
        raise StageError(
            f"{RunLayout.of(args).model_dir(index)}: its first {stage.frozen_layers} layers are not "
            f"the frozen bottom {stage.name} trained on (fingerprint {bottom[:12]}, manifest "
            f"{manifest['fingerprints']['frozen_bottom'][:12]}); rerun the stage from "
            f"scratch: `rm -rf {RunLayout.of(args).stage_dir(index)}` and {repair_command(args, index)}"
        )
    rows = train_rows(args, len(data.train))
    plan = StagePlan.from_args(args)
    _, build = build_cache(
        model,
        cache_request(args, index, stage, data, rows, plan, accelerator.mixed_precision),
        data.train,
        overwrite=True,
    )
    manifest = {**manifest, "cache": {**build, "url": RunLayout.of(args).store_url(index)}}
    if accelerator.is_main_process:
        write_atomic(RunLayout.of(args).manifest(index), json.dumps(manifest, indent=2))
    accelerator.wait_for_everyone()
    accelerator.print(
        f"{stage.name}: store rebuilt in full at {RunLayout.of(args).store_url(index)}"
    )
    return manifest


def earlier_stores(args: RunArgs, stage: Stage, model: BertForMaskedLM) -> list[ActivationStore]:
    """The stores of this run's earlier stages that hold what this model's first layers
    compute (same weights), deepest first: complete or not, as write-through leaves them.
    One that cannot be opened, or was built from other weights, is skipped with a warning:
    its rows are then computed again."""
    if stage.joint:
        return []
    layout, found = RunLayout.of(args), []
    for index in range(stage.index - 1, 1, -1):
        manifest = layout.read_manifest(index)
        if manifest is None or manifest["mode"] not in STORE_MODES:
            continue
        try:
            store = ActivationStore.open(
                manifest["cache"]["url"],
                require_complete=False,
                storage_options=args.schedule.storage_options(),
            )
        except Exception as e:  # deleted or damaged: its rows are computed again
            logger.warning("stage %d's store unusable (%s); not starting from it", index, e)
            continue
        depth = int(store.fingerprint["frozen_layers"])
        if store.fingerprint["weights"] != bottom_fingerprint(model, depth):
            logger.warning("stage %d's store was built from other weights; not using it", index)
            continue
        found.append(store)
    return found


def build_flops(config, seq_len: int, build: dict, stage: Stage, source) -> float:
    """Forward FLOPs the build spent (0 when an existing store was reused)."""
    if build.get("reused"):
        return 0.0
    depth = stage.frozen_layers - (int(source.fingerprint["frozen_layers"]) if source else 0)
    return float(build["rows"]) * seq_len * depth * layer_forward_flops(config, seq_len)


def save_stage(
    accelerator: Accelerator, model, tokenizer, layout: RunLayout, index: int, manifest: dict
) -> None:
    """save_pretrained (+ tokenizer) into a temp dir, rename, then the manifest last: a
    crash never leaves a stage that looks done."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = layout.model_dir(index)
        tmp = final.with_name("model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with saving(tmp, "model"):
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        shutil.rmtree(layout.checkpoint_dir(index), ignore_errors=True)
        write_atomic(layout.manifest(index), json.dumps(manifest, indent=2))
    accelerator.wait_for_everyone()


def make_accelerator(args: RunArgs, *, find_unused_parameters: bool = False) -> Accelerator:
    """The run's Accelerator: precision, accumulation, trackers. `find_unused_parameters`
    lets DDP accept steps in which some trained parameters get no gradient (layer
    dropping skips layers). Also where the process's host memory policy is set, once,
    before any step (`host_memory.keep_freed_memory`)."""
    if args.train.reuse_host_memory:
        keep_freed_memory()
    # Only a precision the user asked for is passed: an explicit one overrides the
    # launcher's (cached_mslt/stages/precision.py).
    precision = requested_precision(args.train.mixed_precision)
    check_precision_supported(effective_precision(args.train.mixed_precision), on_cuda())
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=args.train.gradient_accumulation_steps,
        log_with=args.train.report_to,
        project_dir=args.train.run_dir,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
        ],
    )
    if args.train.report_to:
        accelerator.init_trackers(
            "cached-mslt", config=json.loads(json.dumps(args.to_dict(), default=str))
        )
    return accelerator


def run_all(args: RunArgs) -> list[dict[str, Any]]:
    """Every stage of the plan in order (done stages are skipped), then the summary."""
    check_cache_location(args, StagePlan.from_args(args))
    accelerator = make_accelerator(args)
    plan = StagePlan.from_args(args)
    record_peak(args, accelerator)
    manifests = []
    for st in plan.stages:
        manifests.append(run_stage(args, st.index, accelerator))
        write_run_summary(args)  # a run stopped later still has its table and plot
        budget = args.train.max_wall_s
        if (
            budget is not None
            and manifests[-1]["clock"]["wall_s"] >= budget
            and st != plan.stages[-1]
        ):
            accelerator.print(
                f"wall-clock budget of {budget:.0f}s reached after {st.name}; stopping"
            )
            break
    if accelerator.is_main_process:
        print("\n" + RunLayout.of(args).summary.read_text())
    accelerator.end_training()
    return manifests
