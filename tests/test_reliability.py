"""Fault tests (docs/reliability.md): docs/design.md invariant 8 (a stage is done only if it trained
with finite losses; one owner per run and stage; a store never holds non-finite activations)
and the refusals and recovery commands around the store."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
from transformers import BertForMaskedLM

from cached_mslt.config import ConfigError, parse_args
from cached_mslt.data.corpora import DataError
from cached_mslt.rundir import (
    LOCK_FILE,
    MANIFEST,
    DiskFullError,
    RunLayout,
    RunLockedError,
    write_atomic,
)
from cached_mslt.stages.runner import StageError, run_stage
from cached_mslt.training import checkpointing, trainer
from cached_mslt.training.metrics import read_metrics
from storage import (
    ActivationStore,
    CorruptStoreError,
    NonFiniteActivationsError,
    StaleStoreError,
    StoreLockedError,
    StoreSpec,
)
from tests.conftest import replace_stage_model, small_run

REPO = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def crash_after_first_shard(monkeypatch):
    """`write_shard` writes one shard, then the build stops as a killed one would; returns
    the real `write_shard`."""
    real = ActivationStore.write_shard

    def crash(self, shard, **rows):
        real(self, shard, **rows)
        raise KeyboardInterrupt

    monkeypatch.setattr(ActivationStore, "write_shard", crash)
    return real


def test_stage_with_nonfinite_loss_fails_and_is_never_done(prepared_dir, tmp_path, monkeypatch):
    args = small_run(prepared_dir, tmp_path / "run", stage_steps="8", nonfinite_patience=2)
    real = trainer._phase_inputs

    def poisoned_from_step_3(model, phase, batch, *rest, calls=[0]):  # noqa: B006 - a counter
        calls[0] += 1
        out = real(model, phase, batch, *rest)
        if calls[0] >= 3:
            out = {k: v * float("nan") if v.is_floating_point() else v for k, v in out.items()}
            if "input_ids" in out:
                model.bert.embeddings.word_embeddings.weight.data.fill_(float("nan"))
        return out

    monkeypatch.setattr(trainer, "_phase_inputs", poisoned_from_step_3)
    with pytest.raises(
        StageError, match=r"(?s)stage-1 diverged: 2 consecutive .*--stage 1 --learning_rate 0.0001"
    ):
        run_stage(args, 1)
    assert not (RunLayout.of(args).stage_dir(1) / MANIFEST).exists()
    assert not (RunLayout.of(args).stage_dir(1) / "model").exists()
    # The one checkpoint it kept is from before the divergence (step 2; none at step 4).
    saved = torch.load(
        RunLayout.of(args).checkpoint_dir(1) / checkpointing.PROGRESS_FILE, weights_only=False
    )
    assert saved["step"] == 2


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_store_never_commits_nonfinite_activations(tmp_path, dtype, bad):
    spec = StoreSpec(
        num_rows=8, seq_len=4, hidden_size=2, dtype=dtype, rows_per_chunk=4, chunks_per_shard=1
    )
    store = ActivationStore.create(str(tmp_path / "s"), spec, fingerprint={"w": "1"})
    hidden = torch.zeros(4, 4, 2, dtype=spec.torch_dtype)
    hidden[2, 1, 0] = float(bad)
    hidden[3, 0, 1] = float(bad)
    ints = np.zeros((4, 4), dtype=np.int64)
    with pytest.raises(
        NonFiniteActivationsError, match="refused 2 non-finite values .*first in row 2 of the shard"
    ):
        store.write_shard(
            0, hidden=hidden, attention_mask=ints, labels=ints, row_index=np.arange(4)
        )
    assert store.pending_shards(0, 1) == list(range(store.spec.num_shards))
    # The largest finite values of the dtype, either sign, are data.
    hidden[2, 1, 0] = torch.finfo(spec.torch_dtype).max
    hidden[3, 0, 1] = -torch.finfo(spec.torch_dtype).max
    store.write_shard(0, hidden=hidden, attention_mask=ints, labels=ints, row_index=np.arange(4))
    assert torch.equal(store.read_rows(0, 4)["hidden"], hidden)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_check_finite_refuses_exactly_nan_and_inf(dtype):
    """Every 16-bit pattern (and float32's edges plus random bits): the bit test refuses
    exactly what torch.isfinite calls non-finite."""
    from storage.inputs import check_finite

    spec = StoreSpec(num_rows=1, seq_len=1, hidden_size=1, dtype=dtype)
    if dtype == "float32":
        edges = [0, 0x7F7FFFFF, 0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0x00000001]
        edges += [b | 0x80000000 for b in edges]
        rng = np.random.default_rng(0)
        bits = np.concatenate([np.array(edges), rng.integers(0, 2**32, 200_000)])
        patterns = bits.astype(np.uint32).view(np.float32)
        values = torch.from_numpy(patterns)
    else:
        patterns = np.arange(2**16, dtype=np.uint16)
        values = torch.from_numpy(patterns.view(np.int16)).view(spec.torch_dtype)
        if dtype == "float16":
            patterns = patterns.view(np.float16)
    finite = torch.isfinite(values).numpy()
    assert 0 < finite.sum() < len(finite)
    check_finite(patterns[finite].reshape(-1, 1), spec, "t")  # accepts every finite value
    for bad in np.flatnonzero(~finite):
        one = patterns[finite][:4].copy()
        one[3] = patterns[bad]
        with pytest.raises(NonFiniteActivationsError, match="refused 1 .*first in row 3"):
            check_finite(one.reshape(4, 1), spec, "t")


@pytest.mark.parametrize(
    "flags",
    [
        ["--stage_steps", "0.5"],
        ["--stage_steps", "6,0"],
        ["--stage_tokens", "1e3.5"],
        ["--max_wall_s", "0"],
        ["--max_wall_s", "-1"],
        ["--batch_size", "0"],
        ["--learning_rate", "inf"],
        ["--learning_rate", "nan"],
        ["--nonfinite_patience", "0"],
        ["--gradient_accumulation_steps", "0"],
        ["--warmup_fraction", "1.5"],
        ["--mixed_precision", "fp8"],
    ],
)
def test_every_bad_budget_or_count_is_refused_at_parse_time(flags):
    with pytest.raises(ConfigError, match=rf"--{flags[0][2:]} .*(expected|choose|whole number)"):
        parse_args(flags)


def test_fractional_count_flag_is_refused_not_truncated():
    with pytest.raises(SystemExit):  # argparse: "invalid int value"
        parse_args(["--checkpoint_every", "0.5"])


def test_data_settings_are_checked_against_the_prepared_data_first(prepared_dir, tmp_path):
    args = small_run(prepared_dir, tmp_path / "run", seq_len=64)
    with pytest.raises(DataError, match=r"--seq_len 32 \(run asks 64\).*prepare_data.py"):
        run_stage(args, 1)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_stages_of_one_run_share_the_prepared_data(prepared_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    args = small_run(data, tmp_path / "run", stage_steps="2")
    run_stage(args, 1)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "0" * 64}))
    with pytest.raises(StageError, match="stage 1 trained on prepared data with fingerprint"):
        run_stage(args, 2)


def test_one_owner_per_run_and_stage_a_second_command_is_refused(prepared_dir, tmp_path):
    args = small_run(prepared_dir, tmp_path / "run", stage_steps="2")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = RunLayout.of(args).stage_dir(1) / LOCK_FILE
        lock.parent.mkdir(parents=True)
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        with pytest.raises(
            RunLockedError, match=rf"stage-1 of .* is already running: pid {sleeper.pid}"
        ):
            run_stage(args, 1)
        assert lock.exists()  # the owner's lock is left alone
        assert not (RunLayout.of(args).stage_dir(1) / MANIFEST).exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # Its owner gone (SIGKILL), the lock is stale: the next command takes it over and finishes.
    with pytest.warns(UserWarning, match="taking over"):
        run_stage(args, 1)
    assert (RunLayout.of(args).stage_dir(1) / MANIFEST).exists() and not lock.exists()


def test_full_disk_while_writing_a_manifest_keeps_the_old_one_and_says_so(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old")
    full = OSError(errno.ENOSPC, "No space left on device")
    with patch("os.fsync", side_effect=full), pytest.raises(DiskFullError, match="manifest.json"):
        write_atomic(path, "new")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]


def test_manifest_writes_are_atomic(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old")
    with pytest.raises(ZeroDivisionError), patch("os.replace", side_effect=ZeroDivisionError):
        write_atomic(path, "new")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    write_atomic(path, "new")
    assert path.read_text() == "new" and list(tmp_path.iterdir()) == [path]


def test_corrupt_store_of_a_finished_stage_is_repaired_by_the_command_its_error_names(
    prepared_dir, tmp_path
):
    args = small_run(
        prepared_dir, tmp_path / "run", num_layers=3, stage_layers="1,2,3", stage_steps="2"
    )
    run_stage(args, 1)
    run_stage(args, 2)
    shard = tmp_path / "run" / "cache" / "stage-2" / "hidden" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0x01
    shard.write_bytes(bytes(data))
    # Stage 3 builds incrementally from stage 2's store and hits the flipped byte.
    with pytest.raises(CorruptStoreError, match=r"(?s)crc32c.*fix: .* --stage 2 --rebuild_cache$"):
        run_stage(args, 3)
    assert (RunLayout.of(args).stage_dir(2) / MANIFEST).exists()
    rebuilt = run_stage(args, 2, rebuild_cache=True)  # only the store; training untouched
    assert rebuilt["cache"]["how"] == "full"
    assert (
        ActivationStore.open(str(tmp_path / "run" / "cache" / "stage-2")).attrs["built"] == "full"
    )
    done = run_stage(args, 3)
    built = ActivationStore.open(done["cache"]["url"]).attrs["built"]
    assert built.startswith("incremental from") and done["cache"]["how"] == built


def test_store_attributes_say_how_it_was_actually_built(prepared_dir, tmp_path, monkeypatch):
    """An incremental build that stopped half way, rerun as a full build, is rebuilt as one."""
    args = small_run(
        prepared_dir, tmp_path / "run", num_layers=3, stage_layers="1,2,3", stage_steps="2"
    )
    run_stage(args, 1)
    run_stage(args, 2)
    real = crash_after_first_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_stage(args, 3)
    monkeypatch.setattr(ActivationStore, "write_shard", real)
    store = ActivationStore.open(
        str(tmp_path / "run" / "cache" / "stage-3"), require_complete=False
    )
    assert store.attrs["built"].startswith("incremental from")
    full = small_run(
        prepared_dir,
        tmp_path / "run",
        num_layers=3,
        stage_layers="1,2,3",
        stage_steps="2",
        cache_rebuild="full",
    )
    done = run_stage(full, 3)
    assert ActivationStore.open(done["cache"]["url"]).attrs["built"] == "full"


# slow (`make test-slow`): 7-17 s; the default suite is kept under 10 minutes (2026-12-03)
@pytest.mark.slow
def test_stale_store_error_names_the_command_and_that_command_works(prepared_dir, tmp_path):
    args = small_run(prepared_dir, tmp_path / "run", stage_steps="2")
    run_stage(args, 1)
    model = BertForMaskedLM.from_pretrained(RunLayout.of(args).stage_dir(1) / "model")
    run_stage(args, 2)
    shutil.rmtree(
        RunLayout.of(args).stage_dir(2)
    )  # stage 2 reruns over the store stage 1 no longer matches
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.bias.add_(1.0)
    replace_stage_model(tmp_path / "run", 1, model)
    with pytest.raises(StaleStoreError) as err:
        run_stage(args, 2)
    command = str(err.value).rsplit("fix: ", 1)[1]
    assert command.endswith("--stage 2 --rebuild_cache")
    # The command as printed, run as a real process (python in place of accelerate launch).
    argv = [sys.executable, *command.split()[2:]]
    done = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=300, env=subprocess_env()
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (RunLayout.of(args).stage_dir(2) / MANIFEST).exists()


@pytest.mark.parametrize(
    "damage, named",
    [
        ("delete-root", "zarr.json (the store's root metadata) is missing"),
        ("truncate-root", "zarr.json (the store's root metadata) is corrupt"),
        ("delete-array", "hidden/zarr.json (the 'hidden' array's metadata) is missing or corrupt"),
        (
            "truncate-array",
            "hidden/zarr.json (the 'hidden' array's metadata) is missing or corrupt",
        ),
    ],
)
def test_missing_or_truncated_metadata_is_corrupt_and_names_the_file(tmp_path, damage, named):
    from cached_mslt.inspect.summary import summarize_store
    from storage.synthetic import build_synthetic_store, write_synthetic_shards

    spec = StoreSpec(num_rows=8, seq_len=4, hidden_size=2, rows_per_chunk=4, chunks_per_shard=1)
    url = str(tmp_path / "s")
    build_synthetic_store(url, spec, fingerprint={"w": "1"})
    meta = tmp_path / "s" / ("zarr.json" if damage.endswith("root") else "hidden/zarr.json")
    if damage.startswith("delete"):
        meta.unlink()
    else:
        meta.write_bytes(meta.read_bytes()[:40])
    with pytest.raises(CorruptStoreError, match=re.escape(named)):
        ActivationStore.open(url)
    assert summarize_store(url).status == "corrupt"
    # The repair path works on it: a build with overwrite wipes and rebuilds.
    store = ActivationStore.create(url, spec, fingerprint={"w": "1"}, overwrite=True)
    write_synthetic_shards(store, list(range(store.num_shards)))
    store.commit()
    assert ActivationStore.open(url).is_complete


def test_full_disk_during_checkpoint_names_path_and_free_space_and_leaves_no_tmp(
    prepared_dir, tmp_path, monkeypatch
):
    from accelerate import Accelerator

    args = small_run(prepared_dir, tmp_path / "run", stage_steps="4")

    def short_write(self, output_dir, **kwargs):  # what torch.save says on a full disk
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 64 vs 40")

    monkeypatch.setattr(Accelerator, "save_state", short_write)
    with pytest.raises(
        DiskFullError, match=r"checkpoint into .*stage-1 failed: no space left.*MiB free"
    ):
        run_stage(args, 1)
    assert sorted(p.name for p in RunLayout.of(args).stage_dir(1).iterdir()) == []
    monkeypatch.undo()

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(BertForMaskedLM, "save_pretrained", full)
    with pytest.raises(DiskFullError, match="saving the model into"):
        run_stage(args, 1)
    assert not (RunLayout.of(args).stage_dir(1) / "model.tmp").exists()
    assert not (RunLayout.of(args).stage_dir(1) / MANIFEST).exists()


def test_metrics_hold_each_step_once_after_a_crash_before_the_first_checkpoint(
    prepared_dir, tmp_path, monkeypatch
):
    args = small_run(prepared_dir, tmp_path / "run", stage_steps="6", checkpoint_every=100)
    real = trainer._phase_inputs

    def crash_at_step_4(model, phase, batch, *rest, calls=[0]):  # noqa: B006 - a counter
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(model, phase, batch, *rest)

    monkeypatch.setattr(trainer, "_phase_inputs", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_stage(args, 1)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    monkeypatch.undo()
    run_stage(args, 1)
    steps = [r["step"] for r in read_metrics(tmp_path / "run")]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "option",
    [{"budget_wall_s": 0}, {"budget_tokens": -1}, {"learning_rates": [1e-3, float("inf")]}],
)
def test_comparison_budgets_are_checked_at_parse_time(option):
    from cached_mslt.config import MethodArgs

    with pytest.raises(ConfigError, match=f"--{next(iter(option))} .*expected"):
        MethodArgs(**option)


def test_a_corpus_that_is_not_utf8_is_named_as_such(tmp_path):
    from cached_mslt.config import run_args
    from cached_mslt.data.prepare import prepare_dataset

    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n\nna\xefve\n".encode("latin1"))
    args = run_args("tiny", corpus=[str(corpus)], prepared_dir=str(tmp_path / "p"), num_proc=1)
    with pytest.raises(DataError, match="lines were skipped as not valid UTF-8.*--strict"):
        prepare_dataset(args)


def test_build_started_an_instant_later_is_told_locked_not_to_overwrite(tmp_path):
    """The loser of two simultaneous builds sees the winner's half-laid-out store."""
    url = tmp_path / "s"
    (url / "hidden").mkdir(parents=True)  # the winner wrote an array, not yet the root
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {
            "host": socket.gethostname(),
            "pid": sleeper.pid,
            "build_id": "x",
            "created_at": "t",
        }
        (url / "build.lock").write_text(json.dumps(holder))
        spec = StoreSpec(num_rows=8, seq_len=4, hidden_size=2, rows_per_chunk=4)
        with pytest.raises(StoreLockedError, match=f"is being built by pid {sleeper.pid}"):
            ActivationStore.create(str(url), spec, fingerprint={"w": "1"})
    finally:
        sleeper.kill()
        sleeper.wait()


def test_verify_reports_a_store_written_with_nan_before_builds_refused_it(tmp_path, monkeypatch):
    import storage.inputs
    from cached_mslt.inspect.report import verify_store

    spec = StoreSpec(num_rows=8, seq_len=4, hidden_size=2, rows_per_chunk=4, chunks_per_shard=1)
    monkeypatch.setattr(storage.inputs, "check_finite", lambda *a: None)  # an older writer
    store = ActivationStore.create(str(tmp_path / "s"), spec, fingerprint={"w": "1"})
    ints = np.zeros((4, 4), dtype=np.int64)
    for shard in range(2):
        hidden = torch.full((4, 4, 2), float("nan") if shard else 1.0, dtype=spec.torch_dtype)
        rows = np.arange(4) + 4 * shard
        store.write_shard(shard, hidden=hidden, attention_mask=ints, labels=ints, row_index=rows)
    store.commit()
    with pytest.raises(
        CorruptStoreError, match="hold 32 non-finite hidden values .*first in row 4"
    ):
        verify_store(ActivationStore.open(str(tmp_path / "s")))


def test_checkpoint_of_the_old_format_is_refused_with_the_fix(tmp_path):
    old = tmp_path / "checkpoint"
    old.mkdir()
    (old / checkpointing.LEGACY_TRAINER_STATE).write_text("{}")
    with pytest.raises(checkpointing.OldCheckpointError, match=f"rm -rf {old}"):
        checkpointing.has_checkpoint(old)
    assert not checkpointing.has_checkpoint(tmp_path / "none") and not checkpointing.has_checkpoint(
        None
    )


def test_cache_build_resumes_a_store_started_under_the_old_shard_layout(tmp_path, monkeypatch):
    """Derived layouts changed (storage/spec.py MIN_SHARDS): a build interrupted under the
    old default is finished in the layout its store records, not refused or mixed."""
    import storage.spec
    from cached_mslt.config import ModelArgs
    from cached_mslt.models.bert import build_model
    from cached_mslt.stages.cache import CacheRequest, build_cache

    model = build_model(
        ModelArgs(hidden_size=8, num_attention_heads=2, intermediate_size=16), 120, 2, seed=0
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 120, (64, 8), generator=g)
    cols = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    class Rows:
        def __len__(self):
            return 64

        def __getitem__(self, key):
            return {k: v[key] for k, v in cols.items()}

    def request(name):
        return CacheRequest(
            url=str(tmp_path / name), frozen_layers=1, dtype="float32", codec="none",
            rows_per_chunk=4, data_fingerprint="d", mask_seed=0, seq_len=8, num_rows=64, stage=2,
        )  # fmt: skip

    fresh, _ = build_cache(model, request("fresh"), Rows())
    assert (fresh.spec.chunks_per_shard, fresh.num_shards) == (1, 16)
    monkeypatch.setattr(storage.spec, "MIN_SHARDS", 2)  # a layout the new default never makes
    crash_after_first_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        build_cache(model, request("resumed"), Rows())
    monkeypatch.undo()
    half = ActivationStore.open(str(tmp_path / "resumed"), require_complete=False)
    assert (half.spec.chunks_per_shard, half.shards_done()) == (8, [0])
    resumed, stats = build_cache(model, request("resumed"), Rows())
    assert (resumed.spec.chunks_per_shard, resumed.num_shards, stats["rows"]) == (8, 2, 32)
    for name, values in fresh.read_rows(0, 64).items():
        assert torch.equal(resumed.read_rows(0, 64)[name], values), name
