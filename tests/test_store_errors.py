"""Each refusal has its own error, and its message says what differs and what to do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from storage import (
    ActivationStore,
    IncompleteStoreError,
    StaleStoreError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    StoreSpec,
    StoreWriteError,
)
from storage.synthetic import build_synthetic_store, synthetic_rows

REPO = Path(__file__).resolve().parents[1]
WRITER = REPO / "tests" / "scripts" / "store_writer.py"
FP = {"weights": "w0", "data": "d0"}  # what store_writer.py uses
SPEC = StoreSpec(num_rows=40, seq_len=8, hidden_size=16, rows_per_chunk=4, chunks_per_shard=2)


def writer(url: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, str(WRITER), str(url), "--spec", json.dumps(SPEC.to_dict()), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_open_refuses_an_incomplete_store(tmp_path) -> None:
    store = ActivationStore.create(tmp_path / "s", SPEC, fingerprint=FP)
    store.write_shard(0, **synthetic_rows(SPEC, *store.shard_rows(0)))
    with pytest.raises(IncompleteStoreError, match=r"1/5 shards written.*resume"):
        ActivationStore.open(tmp_path / "s")
    # workers of the build and inspection may open it anyway
    assert ActivationStore.open(tmp_path / "s", mode="r+").pending_shards(0, 1) == [1, 2, 3, 4]
    with pytest.raises(IncompleteStoreError, match="rows 8-16 .shard 1. were never written"):
        ActivationStore.open(tmp_path / "s", require_complete=False).read_rows(8, 12)
    with pytest.raises(IncompleteStoreError, match="4/5 shards are not marked done"):
        store.commit()


def test_open_refuses_a_stale_fingerprint(tmp_path) -> None:
    build_synthetic_store(str(tmp_path / "s"), SPEC, fingerprint=FP)
    with pytest.raises(StaleStoreError) as err:
        ActivationStore.open(
            tmp_path / "s", expected_fingerprint={"weights": "w1", "data": "d0", "seed": "3"}
        )
    msg = str(err.value)
    assert "weights: expected 'w1', found 'w0'" in msg
    assert "seed: expected '3', found '<absent>'" in msg
    assert "data" not in msg.split("expects:")[1].split("rebuild")[0]  # only what differs
    assert "rebuild" in msg
    other = StoreSpec(num_rows=40, seq_len=8, hidden_size=16, dtype="bfloat16")
    with pytest.raises(StaleStoreError, match="dtype: expected 'bfloat16', found 'float16'"):
        ActivationStore.open(tmp_path / "s", expected_spec=other)


def test_open_of_nothing_says_so(tmp_path) -> None:
    with pytest.raises(StoreNotFoundError, match="no activation store"):
        ActivationStore.open(tmp_path / "absent")


@pytest.mark.parametrize(
    "field, value, match",
    [
        (
            "hidden",
            torch.zeros(8, 8, 16, dtype=torch.float32),
            "dtype torch.float32, the store holds float16",
        ),
        (
            "hidden",
            torch.zeros(7, 8, 16, dtype=torch.float16),
            r"shape \(7, 8, 16\), expected \(8, 8, 16\)",
        ),
        ("attention_mask", torch.full((8, 8), 2), r"values in \[2, 2\], expected within \[0, 1\]"),
        ("labels", torch.zeros(8, 8, dtype=torch.float32), "expected an integer dtype"),
        ("row_index", torch.full((8,), -1), "row_index has values"),
    ],
)
def test_write_refuses_wrong_shape_dtype_or_values(
    tmp_path, field: str, value: torch.Tensor, match: str
) -> None:
    store = ActivationStore.create(tmp_path / "s", SPEC, fingerprint=FP)
    rows = {**synthetic_rows(SPEC, 0, 8), field: value}
    with pytest.raises(StoreWriteError, match=match):
        store.write_shard(0, **rows)
    assert not store.is_shard_done(0)


def test_bfloat16_store_refuses_numpy_hidden(tmp_path) -> None:
    spec = StoreSpec(num_rows=8, seq_len=8, hidden_size=16, dtype="bfloat16")
    store = ActivationStore.create(tmp_path / "s", spec, fingerprint=FP)
    rows = synthetic_rows(spec, 0, 8)
    with pytest.raises(StoreWriteError, match="expected a torch.bfloat16 tensor"):
        store.write_shard(0, **{**rows, "hidden": rows["hidden"].view(torch.uint16).numpy()})


def test_create_refuses_a_non_empty_target(tmp_path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(
        StoreExistsError,
        match=r"not empty and holds no activation store \(found \['notes.txt'\]\).*overwrite=True",
    ):
        ActivationStore.create(tmp_path / "s", SPEC, fingerprint=FP)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["notes.txt"]  # untouched
    ActivationStore.create(tmp_path / "s", SPEC, fingerprint=FP, overwrite=True)
    assert not (tmp_path / "s" / "notes.txt").exists()


def test_create_refuses_a_complete_or_different_store(tmp_path) -> None:
    build_synthetic_store(str(tmp_path / "s"), SPEC, fingerprint=FP)
    with pytest.raises(StoreExistsError, match="a complete activation store.*already complete"):
        ActivationStore.create(tmp_path / "s", SPEC, fingerprint=FP)
    with pytest.raises(StoreExistsError, match="fingerprint.weights: expected 'w9', found 'w0'"):
        ActivationStore.create(tmp_path / "s", SPEC, fingerprint={**FP, "weights": "w9"})
    fresh = ActivationStore.create(tmp_path / "s", SPEC, fingerprint=FP, overwrite=True)
    assert not fresh.is_complete and fresh.pending_shards(0, 1) == list(range(5))


def test_create_resumes_an_identical_incomplete_store(tmp_path) -> None:
    store = ActivationStore.create(tmp_path / "s", SPEC, fingerprint=FP)
    store.write_shard(2, **synthetic_rows(SPEC, *store.shard_rows(2)))
    store.release_lock()  # as if that build had stopped
    resumed = ActivationStore.create(tmp_path / "s", SPEC, fingerprint=FP)
    assert resumed.pending_shards(0, 2) == [0, 4] and resumed.pending_shards(1, 2) == [1, 3]


def test_second_create_while_a_build_runs_is_locked(tmp_path) -> None:
    ActivationStore.create(tmp_path / "s", SPEC, fingerprint=FP)  # holds the lock, never commits
    with pytest.raises(
        StoreLockedError, match=rf"this process already holds its build lock \(pid {os.getpid()}"
    ):
        ActivationStore.create(tmp_path / "s", SPEC, fingerprint=FP)


def test_commit_through_a_worker_handle_releases_the_lock(tmp_path) -> None:
    """The trainer's rank 0 creates, then writes and commits through its mode="r+" handle."""
    ActivationStore.create(tmp_path / "s", SPEC, fingerprint=FP)
    worker = ActivationStore.open(tmp_path / "s", mode="r+")
    for shard in worker.pending_shards(0, 1):
        worker.write_shard(shard, **synthetic_rows(SPEC, *worker.shard_rows(shard)))
    worker.commit()
    assert not (tmp_path / "s" / "build.lock").exists()
    ActivationStore.create(tmp_path / "s", SPEC, fingerprint=FP, overwrite=True)  # not locked


def test_lock_of_a_live_process_blocks_and_of_a_dead_one_is_taken_over(tmp_path) -> None:
    holder = writer(tmp_path / "s", "--create", "--hold", "60")
    try:
        assert json.loads(holder.stdout.readline()) == {"ready": True}, holder.stderr.read()
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid} on host"):
            ActivationStore.create(tmp_path / "s", SPEC, fingerprint=FP)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with pytest.warns(UserWarning, match=f"taking over the build lock of pid {holder.pid}"):
        store = ActivationStore.create(tmp_path / "s", SPEC, fingerprint=FP)
    store.commit  # noqa: B018 - the resumed handle is a normal writer
    assert store.pending_shards(0, 1) == list(range(5))


def test_full_disk_is_a_write_error_and_leaves_the_store_incomplete(tmp_path) -> None:
    ActivationStore.create(tmp_path / "s", SPEC, fingerprint=FP).release_lock()
    # A hidden shard is 8 rows * 8 * 16 * 2 bytes = 2 KiB; allow 1 KiB files.
    proc = writer(tmp_path / "s", "--fsize-limit", "1024", "--commit")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (
        f"writer should fail cleanly, not die by SIGXFSZ: {proc.returncode} {err}"
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["error"] == "StoreWriteError" and result["written"] == []
    assert "shard 0" in result["message"] and "File too large" in result["message"]
    reopened = ActivationStore.open(tmp_path / "s", mode="r+")
    assert not reopened.is_complete and reopened.pending_shards(0, 1) == list(range(5))
    assert not list((tmp_path / "s").rglob("*.partial"))
    with pytest.raises(IncompleteStoreError):
        ActivationStore.open(tmp_path / "s")
