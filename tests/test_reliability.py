"""Fault tests (docs/reliability.md): DESIGN.md invariant 8 (a stage is done only if it trained
with finite losses; one owner per run and stage; a store never holds non-finite activations)
and the refusals and recovery commands around the store."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from unittest.mock import patch

import numpy as np
import pytest
import torch

from cached_mslt import trainer
from cached_mslt.config import ConfigError, parse_args
from cached_mslt.corpora import DataError
from cached_mslt.rundir import LOCK_FILE, RunLockedError, write_atomic
from cached_mslt.stages import MANIFEST, StageError, run_stage, stage_dir
from storage import ActivationStore, NonFiniteActivationsError, StoreSpec
from tests.conftest import small_run


def test_stage_with_nonfinite_loss_fails_and_is_never_done(prepared_dir, tmp_path, monkeypatch):
    args = small_run(prepared_dir, tmp_path / "run", stage_steps="8", nonfinite_patience=2)
    real = trainer._phase_inputs

    def poisoned_from_step_3(model, phase, batch, calls=[0]):  # noqa: B006 - a call counter
        calls[0] += 1
        out = real(model, phase, batch)
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
    assert not (stage_dir(args, 1) / MANIFEST).exists()
    assert not (stage_dir(args, 1) / "model").exists()
    # The one checkpoint it kept is from before the divergence (step 2; none at step 4).
    saved = json.loads((stage_dir(args, 1) / "checkpoint" / trainer.TRAINER_STATE).read_text())
    assert saved["step"] == 2


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_store_never_commits_nonfinite_activations(tmp_path, dtype):
    spec = StoreSpec(
        num_rows=8, seq_len=4, hidden_size=2, dtype=dtype, rows_per_chunk=4, chunks_per_shard=1
    )
    store = ActivationStore.create(str(tmp_path / "s"), spec, fingerprint={"w": "1"})
    hidden = torch.zeros(4, 4, 2, dtype=spec.torch_dtype)
    hidden[2, 1, 0] = float("nan")
    ints = np.zeros((4, 4), dtype=np.int64)
    with pytest.raises(NonFiniteActivationsError, match="first in row 2 of the shard"):
        store.write_shard(
            0, hidden=hidden, attention_mask=ints, labels=ints, row_index=np.arange(4)
        )
    assert store.pending_shards(0, 1) == list(range(store.spec.num_shards))


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
        lock = stage_dir(args, 1) / LOCK_FILE
        lock.parent.mkdir(parents=True)
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        with pytest.raises(
            RunLockedError, match=rf"stage-1 of .* is already running: pid {sleeper.pid}"
        ):
            run_stage(args, 1)
        assert lock.exists()  # the owner's lock is left alone
        assert not (stage_dir(args, 1) / MANIFEST).exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # Its owner gone (SIGKILL), the lock is stale: the next command takes it over and finishes.
    with pytest.warns(UserWarning, match="taking over"):
        run_stage(args, 1)
    assert (stage_dir(args, 1) / MANIFEST).exists() and not lock.exists()


def test_manifest_writes_are_atomic(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old")
    with pytest.raises(ZeroDivisionError), patch("os.replace", side_effect=ZeroDivisionError):
        write_atomic(path, "new")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    write_atomic(path, "new")
    assert path.read_text() == "new" and list(tmp_path.iterdir()) == [path]
