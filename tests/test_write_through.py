"""Write-through stages (docs/design.md, invariant 9): the training steps fill the store,
each frozen layer runs at most once per row over the schedule, and a write-through stage
trains exactly like a live one, whichever rows its store held when it started."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict

import pytest
import torch
import zarr

from cached_mslt.config import run_args
from cached_mslt.data.prepare import load_prepared
from cached_mslt.rundir import RunLayout
from cached_mslt.stages import StagePlan
from cached_mslt.stages import write_through as wt
from cached_mslt.stages.cache_choice import MODES, Stored, choose_cache, stage_cost
from cached_mslt.stages.runner import run_all, run_stage
from storage import ActivationStore
from tests.conftest import small_run
from tests.test_stages import assert_same_params, params

# 1 -> 2 -> 3 -> 4 layers over 40 rows (10 units of 4): stages 2 and 3 read 0.3 of an
# epoch, so their stores are partial and later stages start from them; stage 4 reads 1.5
# epochs, so it computes every row it lacks once and reads rows back.
FOUR_STAGES = dict(
    stage_layers="1,2,3,4", stage_steps="3,3,3,15", batch_size=4, dropout=0.0, train_examples=40
)


def stage_params(args, index):
    return params(RunLayout.of(args).model_dir(index))


@pytest.fixture(scope="module")
def live_four(prepared_dir, tmp_path_factory):
    args = small_run(prepared_dir, tmp_path_factory.mktemp("live"), cache="never", **FOUR_STAGES)
    run_all(args)
    return args


def test_write_through_stages_train_exactly_like_live_stages(prepared_dir, tmp_path, live_four):
    args = small_run(prepared_dir, tmp_path, cache="write-through", **FOUR_STAGES)
    manifests = run_all(args)
    assert [m["mode"] for m in manifests] == ["live"] + ["write-through"] * 3
    for index in (2, 3, 4):
        assert_same_params(stage_params(live_four, index), stage_params(args, index))
    rows = len(load_prepared(prepared_dir).train)
    # Stage 4 reads 1.6 epochs: every unit computed once, the rest read back.
    last = manifests[-1]["cache"]
    assert last["units_held"] == last["units"] and last["units_read"] > 0
    assert ActivationStore.open(RunLayout.of(args).store_url(4)).is_complete
    assert manifests[1]["cache"]["units_held"] < 10 <= rows // 4  # stage 2 read part of them


def test_no_row_passes_through_a_frozen_layer_twice_over_four_stages(
    prepared_dir, tmp_path, monkeypatch
):
    """Every frozen forward of a training row goes through `frozen_output`, called with the
    rows' ids or stored entries and the layers [start, stop) it runs: record each row's
    layers there (row identity from the positions the step computes)."""
    ran: dict[int, list[int]] = defaultdict(list)  # row -> every frozen layer it went through
    real_hidden = wt.WriteThrough.hidden

    def hidden(self, batch):
        layers_seen = []
        real_output = wt.frozen_output

        def recording(model, mask, *, stop, start=0, **kw):
            layers_seen.append(list(range(start, stop)))
            return real_output(model, mask, stop=stop, start=start, **kw)

        monkeypatch.setattr(wt, "frozen_output", recording)
        try:
            out = real_hidden(self, batch)
        finally:
            monkeypatch.setattr(wt, "frozen_output", real_output)
        groups = batch["fill"].groups
        assert len(groups) == len(layers_seen)
        for (_, positions), layers in zip(groups, layers_seen, strict=True):
            for p in positions.tolist():
                ran[int(batch["row_index"][p])] += layers
        return out

    def live_bottom(*_, **__):
        raise AssertionError("a write-through stage ran its frozen bottom live")

    monkeypatch.setattr(wt.WriteThrough, "hidden", hidden)
    monkeypatch.setattr("cached_mslt.training.trainer.bottom_forward", live_bottom)
    args = small_run(prepared_dir, tmp_path, cache="write-through", **FOUR_STAGES)
    run_all(args)
    assert ran, "no write-through step computed anything: the test proves nothing"
    for row, layers in ran.items():
        assert len(layers) == len(set(layers)), f"row {row} ran layers {sorted(layers)}"
    # Rows stored at an earlier stage started from its store: some rows ran up to layer 2
    # in two goes (stage 3 from stage 2's store), none ran a layer twice.
    assert any(sorted(layers) == [0, 1, 2] for layers in ran.values())


def test_a_batch_mixing_stored_and_computed_rows_trains_like_live(prepared_dir, tmp_path):
    """Stage 2 rerun over its own store with every other unit deleted: its batches (two
    units each) mix rows read back and rows computed; it trains to the live parameters."""
    mixed = dict(stage_layers="2,4", stage_steps="3,4", batch_size=12, train_examples=48)
    live = small_run(prepared_dir, tmp_path / "live", cache="never", dropout=0.0, **mixed)
    run_all(live)
    args = small_run(prepared_dir, tmp_path / "wt", cache="write-through", dropout=0.0, **mixed)
    run_stage(args, 1)
    run_stage(args, 2)
    layout = RunLayout.of(args)
    store = ActivationStore.open(layout.store_url(2), mode="r+", require_complete=False)
    held = store.shards_done()
    assert len(held) == store.num_shards == 8  # one epoch: every unit written
    for unit in held[::2]:  # unset: computed again by the rerun
        store._markers[unit] = 0
    zarr.open_group(layout.store_url(2), mode="r+").attrs["complete"] = False
    shutil.rmtree(layout.stage_dir(2))
    manifest = run_stage(args, 2)
    assert manifest["cache"]["units_read"] == 4 and manifest["cache"]["units_computed"] == 4
    assert_same_params(stage_params(live, 2), stage_params(args, 2))


def test_sixteen_bit_store_bytes_are_one_function_of_the_fingerprint(prepared_dir, tmp_path):
    """Write-through (rows from earlier stores and from ids), an eager incremental build
    and an eager full rebuild of stage 3 hold the same float16 bytes for every row."""
    common = dict(FOUR_STAGES, cache_dtype="float16")
    through = small_run(prepared_dir, tmp_path / "wt", cache="write-through", **common)
    for index in (1, 2, 3):
        run_stage(through, index)
    eager = tmp_path / "eager"
    shutil.copytree(tmp_path / "wt", eager, ignore=shutil.ignore_patterns("cache", "stage-3"))
    for rebuild in ("incremental", "full"):
        args = small_run(prepared_dir, eager, cache="always", cache_rebuild=rebuild, **common)
        run_stage(args, 2, rebuild_cache=True)
        shutil.rmtree(eager / "stage-3", ignore_errors=True)
        run_stage(args, 3, rebuild_cache=True)
        built = ActivationStore.open(RunLayout.of(args).store_url(3))
        filled = ActivationStore.open(RunLayout.of(through).store_url(3), require_complete=False)
        assert built.fingerprint == filled.fingerprint
        assert "rounded_at" in built.fingerprint
        for unit in filled.shards_done():
            a, b = filled.shard_rows(unit)
            assert torch.equal(
                built.read_hidden(a, b).view(torch.int16),
                filled.read_hidden(a, b).view(torch.int16),
            ), (rebuild, unit)


def test_two_writers_of_one_unit_write_identical_bytes(prepared_dir, tmp_path):
    args = small_run(prepared_dir, tmp_path, cache="write-through", stage_layers="2,4")
    run_stage(args, 1)
    run_stage(args, 2)
    url = RunLayout.of(args).store_url(2)
    store = ActivationStore.open(url, require_complete=False)
    unit = store.shards_done()[0]
    rows = store.read_rows(*store.shard_rows(unit))
    key = store._shard_keys(unit)["hidden"]
    before = (tmp_path / "cache" / "stage-2" / key).read_bytes()
    writers = [ActivationStore.open(url, mode="r+", require_complete=False) for _ in range(2)]
    for w in writers:  # the second rank to compute the unit writes over the first
        w.write_shard(unit, **rows)
    assert (tmp_path / "cache" / "stage-2" / key).read_bytes() == before


def test_auto_takes_write_through_where_it_saves_layer_forwards():
    plan = StagePlan.from_args(run_args("tiny", stage_layers="3,6,9,12", cache="auto"))
    rows = 1000

    def choose(index, reads, stored=()):
        return choose_cache(plan, plan[index], rows, lambda s: reads, list(stored))[0]

    # Under an epoch a stage, write-through stores what later stages start from.
    assert choose(2, reads=200) == "write-through"
    assert choose(2, reads=770) == "write-through"
    # The last stage with nothing stored before it: writing would only cost I/O.
    assert choose(4, reads=400) == "live"
    # ... unless it reads rows again, or earlier stores save it layers.
    assert choose(4, reads=1500) == "write-through"
    assert choose(4, reads=400, stored=[Stored(6, 0.5)]) == "write-through"


def test_write_through_cost_never_exceeds_live_or_eager():
    plan = StagePlan.from_args(run_args("tiny", stage_layers="3,6,9,12", cache="auto"))
    for reads in (100, 500, 1000, 3000):
        for stored in ([], [Stored(3, 0.4)], [Stored(3, 1.0), Stored(6, 0.2)]):
            for stage in plan.stages[1:]:
                costs = {m: stage_cost(m, stage, 1000, reads, stored) for m in MODES}
                assert costs["write-through"] <= min(costs["live"], costs["eager"]) + 1e-9


class Crash(Exception):
    pass


def test_interrupted_write_through_stage_resumes_to_the_same_model_and_store(
    prepared_dir, tmp_path, monkeypatch
):
    common = dict(FOUR_STAGES, stage_layers="2,4", stage_steps="3,8", checkpoint_every=3)
    straight = small_run(prepared_dir, tmp_path / "straight", cache="write-through", **common)
    run_all(straight)
    crashed = small_run(prepared_dir, tmp_path / "crashed", cache="write-through", **common)
    run_stage(crashed, 1)
    real, calls = wt.WriteThrough.hidden, []

    def crash_at_step_5(self, batch):
        calls.append(1)
        if len(calls) == 5:  # after the step-3 checkpoint, with units queued for writing
            raise Crash()
        return real(self, batch)

    monkeypatch.setattr(wt.WriteThrough, "hidden", crash_at_step_5)
    with pytest.raises(Crash):
        run_stage(crashed, 2)
    monkeypatch.setattr(wt.WriteThrough, "hidden", real)
    manifest = run_stage(crashed, 2)  # resumes from the checkpoint and the units written
    assert manifest["train"]["steps"] == 8
    assert_same_params(stage_params(straight, 2), stage_params(crashed, 2))
    a = ActivationStore.open(RunLayout.of(straight).store_url(2), require_complete=False)
    b = ActivationStore.open(RunLayout.of(crashed).store_url(2), require_complete=False)
    assert a.shards_done() == b.shards_done()
    for unit in a.shards_done():
        rows = a.shard_rows(unit)
        assert torch.equal(a.read_hidden(*rows), b.read_hidden(*rows)), unit


def held_units(url: str, **options) -> dict[int, bytes]:
    store = ActivationStore.open(url, require_complete=False, storage_options=options or None)
    return {
        u: store.read_hidden(*store.shard_rows(u)).numpy().tobytes() for u in store.shards_done()
    }


def test_two_rank_write_through_stage_matches_one_process(prepared_dir, tmp_path):
    from tests.test_distributed import launch_two_ranks, start_from_stage_one

    # dropout 0: two ranks draw other dropout masks than one process would.
    # 48 rows: 6 units of 8, three global batches of 16 an epoch; stage 2 reads 4 batches.
    common = dict(FOUR_STAGES, stage_layers="2,4", stage_steps="3,4", cache="write-through")
    common["train_examples"] = 48
    one = small_run(prepared_dir, tmp_path / "one", **{**common, "batch_size": 16})
    run_stage(one, 1)
    run_stage(one, 2)
    start_from_stage_one(tmp_path / "one", tmp_path / "two")
    launch_two_ranks(prepared_dir, tmp_path / "two", 2, **{**common, "batch_size": 8})
    # The same global batches read the same rows: the same units, byte for byte, each
    # written by the rank that read it.
    a = held_units(str(tmp_path / "one" / "cache" / "stage-2"))
    b = held_units(str(tmp_path / "two" / "cache" / "stage-2"))
    assert a == b and len(a) == 6
    p1, p2 = stage_params(one, 2), params(tmp_path / "two" / "stage-2" / "model")
    for k in p1:  # per-rank means: gradients agree to rounding (tests/test_distributed.py)
        assert (p1[k] - p2[k]).abs().max() <= 2 * one.train.learning_rate * 4, k


def test_write_through_stage_on_s3_equals_a_local_one(prepared_dir, tmp_path, s3_bucket):
    bucket, options = s3_bucket
    common = dict(FOUR_STAGES, stage_layers="2,4", stage_steps="3,4", cache="write-through")
    local = small_run(prepared_dir, tmp_path / "local", **common)
    remote = small_run(
        prepared_dir,
        tmp_path / "s3",
        cache_url=f"s3://{bucket}/cache",
        cache_storage_options=json.dumps(options),
        **common,
    )
    for args in (local, remote):
        run_stage(args, 1)
        run_stage(args, 2)
    assert_same_params(stage_params(local, 2), stage_params(remote, 2))
    on_s3 = held_units(f"s3://{bucket}/cache/stage-2", **options)
    assert on_s3 == held_units(str(tmp_path / "local" / "cache" / "stage-2")) and on_s3


def test_block_rows_sets_the_unit_and_write_through_still_equals_live(prepared_dir, tmp_path):
    """--block_rows: one batch is one block (the fewest, largest store reads); the unit
    and the chunk follow it, and the stage still trains exactly like a live one."""
    common = dict(FOUR_STAGES, stage_layers="2,4", stage_steps="3,2", batch_size=16, block_rows=16)
    runs = {
        mode: small_run(prepared_dir, tmp_path / mode, cache=mode, **common)
        for mode in ("never", "write-through")
    }
    for args in runs.values():
        run_stage(args, 1)
        run_stage(args, 2)
    assert_same_params(stage_params(runs["never"], 2), stage_params(runs["write-through"], 2))
    url = RunLayout.of(runs["write-through"]).store_url(2)
    store = ActivationStore.open(url, require_complete=False)
    assert store.spec.rows_per_chunk == 16 and store.spec.chunks_per_shard == 1
    with pytest.raises(ValueError, match="--block_rows 3: expected a divisor of --batch_size 16"):
        small_run(prepared_dir, tmp_path / "bad", **dict(common, block_rows=3))


def test_inspect_reads_a_partly_filled_write_through_store(prepared_dir, tmp_path):
    from cached_mslt.inspect import block_ranges, hidden_stats, open_store, summarize_run

    args = small_run(prepared_dir, tmp_path, cache="write-through", **FOUR_STAGES)
    run_stage(args, 1)
    run_stage(args, 2)
    entry = summarize_run(tmp_path)[1]
    assert entry.mode == "write-through" and entry.store.status == "ok"
    assert 0 < entry.store.shards_done < entry.store.num_shards
    store = open_store(entry.store.url)
    ranges = block_ranges(store)
    held = {r for u in store.shards_done() for r in range(*store.shard_rows(u))}
    assert {r for a, b in ranges for r in range(a, b)} == held  # only the units it holds
    assert hidden_stats(store).rows == len(held)
