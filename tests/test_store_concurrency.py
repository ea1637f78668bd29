"""No write is lost (docs/design.md invariant 6): concurrent writers, real ranks, kill and resume."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from storage import ActivationStore, StoreSpec
from storage.synthetic import build_synthetic_store, synthetic_rows, write_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "scripts"
FP = {"weights": "w0", "data": "d0"}  # what the scripts use
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def assert_store_holds_synthetic_rows(url: str, spec: StoreSpec) -> None:
    got, want = (
        ActivationStore.open(url).read_rows(0, spec.num_rows),
        synthetic_rows(spec, 0, spec.num_rows),
    )
    assert torch.equal(got["hidden"].view(torch.int16), want["hidden"].view(torch.int16))
    for key in ("attention_mask", "labels", "row_index"):
        assert torch.equal(got[key], want[key]), key


def _write_owned(url: str, rank: int, world: int) -> None:
    """Body of one spawned writer process."""
    store = ActivationStore.open(url, mode="r+", expected_fingerprint=FP)
    write_synthetic_shards(store, store.pending_shards(rank, world))


@pytest.mark.parametrize("world", [2, 4])
def test_processes_writing_one_store_lose_nothing(tmp_path, world: int) -> None:
    # 21 shards of 4 rows (uneven ownership), 2 rows per chunk
    spec = StoreSpec(num_rows=82, seq_len=8, hidden_size=16, rows_per_chunk=2, chunks_per_shard=2)
    url = str(tmp_path / "s")
    creator = ActivationStore.create(url, spec, fingerprint=FP)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_owned, args=(url, rank, world)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * world
    creator.commit()
    assert_store_holds_synthetic_rows(url, spec)


def test_two_accelerate_ranks_build_and_read_one_store(tmp_path) -> None:
    accelerate = Path(sys.executable).parent / "accelerate"
    out = tmp_path / "report.json"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(SCRIPTS / "store_two_rank.py"), str(tmp_path / "s"), str(out)]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env={**ENV, "ACCELERATE_USE_CPU": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    ranks = sorted(report["ranks"], key=lambda r: r["rank"])
    assert report["complete"] and all(r["rows_ok"] for r in ranks)
    assert [r["written"] for r in ranks] == [[0, 2, 4], [1, 3, 5]]

    num_rows, block_rows, blocks_per_batch = 64, 4, 2
    for epoch in ("0", "1"):
        seen = [row for r in ranks for batch in r["batches"][epoch] for row in batch]
        assert sorted(seen) == list(range(1_000_000, 1_000_000 + num_rows))  # each row once
        # rank r gets batches r, r + 2, ... of the one seeded order every rank computes
        order = report["block_orders"][epoch]
        batches = [order[i : i + blocks_per_batch] for i in range(0, len(order), blocks_per_batch)]
        for r in ranks:
            want = [
                [1_000_000 + b * block_rows + k for b in blocks for k in range(block_rows)]
                for blocks in batches[r["rank"] :: 2]
            ]
            assert r["batches"][epoch] == want
    assert report["block_orders"]["0"] != report["block_orders"]["1"]


def store_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_killed_build_resumes_byte_identical(tmp_path) -> None:
    spec = StoreSpec(
        num_rows=60, seq_len=8, hidden_size=16, codec="zstd", rows_per_chunk=4, chunks_per_shard=2
    )
    build_synthetic_store(str(tmp_path / "reference"), spec, fingerprint=FP)

    url = tmp_path / "s"
    cmd = [sys.executable, str(SCRIPTS / "store_writer.py"), str(url), "--create", "--delay", "0.5"]
    cmd += ["--spec", json.dumps(spec.to_dict())]
    victim = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        done = 0
        for line in victim.stdout:
            done += "shard_done" in json.loads(line)
            if done == 3:
                break
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    assert done == 3, "the writer died before writing 3 shards"
    # What a kill in the middle of a write leaves: Zarr's temporary file, never renamed.
    leftover = url / "hidden/c/6/0/0.0123456789abcdef.partial"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half a shard")

    interrupted = ActivationStore.open(url, mode="r+")
    assert not interrupted.is_complete and 3 <= len(interrupted.shards_done()) < spec.num_shards
    with pytest.warns(UserWarning, match=f"taking over the build lock of pid {victim.pid}"):
        resumed = ActivationStore.create(url, spec, fingerprint=FP)
    pending = resumed.pending_shards(0, 1)
    assert 0 < len(pending) <= spec.num_shards - 3
    write_synthetic_shards(resumed, pending)
    resumed.commit()

    got, want = store_files(url), store_files(tmp_path / "reference")
    assert got.keys() == want.keys()
    assert [k for k in want if k != "zarr.json" and got[k] != want[k]] == []
    # the root metadata differs only in build timestamps
    attrs = [json.loads(files["zarr.json"])["attributes"] for files in (got, want)]
    for a in attrs:
        del a["created_at"], a["completed_at"]
    assert attrs[0] == attrs[1]


def test_leave_process_group_destroys_the_group_and_is_safe_to_repeat(tmp_path) -> None:
    """Every distributed entry point leaves its process group on success: a gloo process
    that exits with its group alive can abort in teardown (cached_mslt/training/processes.py)."""
    import torch.distributed as dist

    from cached_mslt.training import leave_process_group

    leave_process_group()  # no group: nothing to do
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    assert dist.is_initialized()
    leave_process_group()
    assert not dist.is_initialized()
    leave_process_group()  # already left: still nothing to do
