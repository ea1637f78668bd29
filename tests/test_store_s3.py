"""The store on a real S3 API (moto on loopback): same bytes, same refusals as on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import zarr

from storage import (
    ActivationStore,
    BlockDataset,
    CorruptStoreError,
    StoreLockedError,
    StoreSpec,
    StoreUnreachableError,
    make_block_loader,
)
from storage.backend import open_zarr_store
from storage.remote import create_exclusive, public_options
from storage.synthetic import build_synthetic_store, write_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
FP = {"weights": "w0", "data": "d0"}  # what tests/scripts/store_writer.py uses
# 3 shards of 8 rows, 4 rows per chunk; float32 so a flipped byte cannot hide in a NaN
SPEC = StoreSpec(
    num_rows=24, seq_len=8, hidden_size=16, dtype="float32", rows_per_chunk=4, chunks_per_shard=2
)
ARRAYS = ("hidden", "attention_mask", "labels", "row_index", "shard_done")


def s3fs_of(options):
    import s3fs

    return s3fs.S3FileSystem(**options, skip_instance_cache=True)


def test_store_on_s3_reads_back_with_plain_zarr_equal_to_local(s3_bucket, tmp_path) -> None:
    bucket, options = s3_bucket
    url = f"s3://{bucket}/run/stage-2"
    build_synthetic_store(url, SPEC, fingerprint=FP, storage_options=options)
    build_synthetic_store(str(tmp_path / "local"), SPEC, fingerprint=FP)
    remote = zarr.open_group(url, mode="r", storage_options=options)
    local = zarr.open_group(str(tmp_path / "local"), mode="r")
    assert remote.attrs["complete"]
    for name in ARRAYS:
        assert remote[name][:].tobytes() == local[name][:].tobytes(), name
    # nothing but the store's own keys: no lock left, no credentials anywhere in it
    keys = s3fs_of(options).find(f"{bucket}/run/stage-2")
    assert not [k for k in keys if k.endswith("build.lock")]
    text = b"".join(s3fs_of(options).cat(k) for k in keys if k.endswith("zarr.json"))
    assert options["secret"].encode() not in text and options["key"].encode() not in text


def test_flipped_byte_in_an_s3_object_names_the_object(s3_bucket) -> None:
    bucket, options = s3_bucket
    url = f"s3://{bucket}/s"
    build_synthetic_store(url, SPEC, fingerprint=FP, storage_options=options)
    fs = s3fs_of(options)
    data = bytearray(fs.cat(f"{bucket}/s/hidden/c/1/0/0"))
    data[10] ^= 0x01
    fs.pipe_file(f"{bucket}/s/hidden/c/1/0/0", bytes(data))
    reader = ActivationStore.open(url, storage_options=options)
    reader.read_rows(0, 8)  # other objects still read
    with pytest.raises(
        CorruptStoreError,
        match=r"chunk \(2, 0, 0\) \(rows 8-12, in shard file hidden/c/1/0/0\) fails its crc32c",
    ):
        reader.read_blocks([(0, 4), (8, 12), (20, 24)])  # the loader's concurrent read


def test_deleted_s3_object_is_a_missing_chunk(s3_bucket) -> None:
    bucket, options = s3_bucket
    url = f"s3://{bucket}/s"
    build_synthetic_store(url, SPEC, fingerprint=FP, storage_options=options)
    reader = ActivationStore.open(url, storage_options=options)
    s3fs_of(options).rm(f"{bucket}/s/row_index/c/2")
    with pytest.raises(
        CorruptStoreError, match=r"shard file row_index/c/2 \(rows 16-24\) is missing"
    ):
        reader.read_blocks([(0, 4), (16, 20)])  # the loader path, small arrays whole first
    with pytest.raises(CorruptStoreError, match=r"missing or empty: row_index/c/2\."):
        ActivationStore.open(url, storage_options=options)


def test_loader_workers_read_every_row_of_an_s3_store_once(s3_bucket) -> None:
    bucket, options = s3_bucket
    url = f"s3://{bucket}/s"
    build_synthetic_store(url, SPEC, fingerprint=FP, storage_options=options)
    store = ActivationStore.open(url, storage_options=options)
    epochs = {}
    for workers in (0, 2):  # forked workers must not reuse the parent's HTTP session
        loader = make_block_loader(
            BlockDataset(store), rows_per_batch=8, shuffle=True, seed=3, num_workers=workers
        )
        epochs[workers] = [batch for batch in loader]
    assert len(epochs[0]) == len(epochs[2]) == 3
    for a, b in zip(epochs[0], epochs[2]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    rows = torch.cat([b["row_index"] for b in epochs[2]]).sort().values
    assert torch.equal(rows, store.read_rows(0, SPEC.num_rows)["row_index"])


def test_unreachable_endpoint_and_missing_bucket_fail_fast_with_one_message(s3_bucket) -> None:
    bucket, options = s3_bucket
    began = time.monotonic()
    with pytest.raises(StoreUnreachableError, match=r"bucket 'no-such-bucket' does not exist") as e:
        ActivationStore.create(
            "s3://no-such-bucket/s", SPEC, fingerprint=FP, storage_options=options
        )
    assert e.value.__cause__ is None and e.value.__suppress_context__
    closed = {**options, "endpoint_url": "http://127.0.0.1:9"}  # discard port: nothing listens
    with pytest.raises(
        StoreUnreachableError, match=r"cannot reach s3://.*endpoint http://127.0.0.1:9"
    ) as e:
        ActivationStore.create(f"s3://{bucket}/s", SPEC, fingerprint=FP, storage_options=closed)
    assert options["secret"] not in str(e.value)
    assert time.monotonic() - began < 30
    assert s3fs_of(options).find(bucket) == []  # nothing was written


def test_lock_on_s3_is_a_conditional_create_exactly_one_racer_wins(s3_bucket) -> None:
    bucket, options = s3_bucket
    store = open_zarr_store(f"s3://{bucket}/race", read_only=False, storage_options=options)
    results, barrier = [], threading.Barrier(6)

    def racer(i: int) -> None:
        barrier.wait(timeout=30)
        results.append((i, *create_exclusive(store, "build.lock", f"racer {i}".encode())))

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [i for i, created, atomic in results if created]
    assert len(results) == 6 and all(atomic for _, _, atomic in results)
    assert len(winners) == 1
    assert s3fs_of(options).cat(f"{bucket}/race/build.lock") == f"racer {winners[0]}".encode()


def test_second_build_of_an_s3_store_is_refused_while_the_first_holds_it(s3_bucket) -> None:
    bucket, options = s3_bucket
    url = f"s3://{bucket}/s"
    holder = ActivationStore.create(url, SPEC, fingerprint=FP, storage_options=options)
    fs = s3fs_of(options)
    lock = json.loads(fs.cat(f"{bucket}/s/build.lock"))
    lock["host"] = "another-host"  # a live build elsewhere: its pid means nothing here
    fs.pipe_file(f"{bucket}/s/build.lock", json.dumps(lock).encode())
    with pytest.raises(StoreLockedError, match="being built by pid .* on host another-host"):
        ActivationStore.create(url, SPEC, fingerprint=FP, storage_options=options)
    fs.rm(f"{bucket}/s/build.lock")
    write_synthetic_shards(holder, [0, 1, 2])
    holder.commit()


# slow (`make test-slow`): 6-9 s; the default suite took 10.7 minutes on a fresh clone (2026-12-03)
@pytest.mark.slow
def test_killed_build_on_s3_resumes_and_completes(s3_bucket, tmp_path) -> None:
    bucket, options = s3_bucket
    url = f"s3://{bucket}/s"
    spec = StoreSpec(
        num_rows=40,
        seq_len=8,
        hidden_size=16,
        dtype="float32",
        rows_per_chunk=4,
        chunks_per_shard=1,
    )
    # The writer finds the endpoint and credentials in the environment, as a cluster job would.
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_ENDPOINT_URL": options["endpoint_url"]}
    env |= {"AWS_ACCESS_KEY_ID": options["key"], "AWS_SECRET_ACCESS_KEY": options["secret"]}
    cmd = [sys.executable, str(REPO / "tests/scripts/store_writer.py"), url, "--create"]
    cmd += ["--delay", "0.3", "--spec", json.dumps(spec.to_dict())]
    victim = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        done = 0
        for line in victim.stdout:  # bounded: the writer prints one line per shard, then exits
            done += "shard_done" in json.loads(line)
            if done == 3:
                break
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    assert done == 3, "the writer died before writing 3 shards"

    with pytest.warns(UserWarning, match=f"taking over the build lock of pid {victim.pid}"):
        resumed = ActivationStore.create(url, spec, fingerprint=FP, storage_options=options)
    pending = resumed.pending_shards(0, 1)
    assert 0 < len(pending) <= spec.num_shards - 3
    write_synthetic_shards(resumed, pending)
    resumed.commit()
    reference = build_synthetic_store(str(tmp_path / "ref"), spec, fingerprint=FP)
    got = ActivationStore.open(url, storage_options=options).read_rows(0, spec.num_rows)
    want = ActivationStore.open(reference.url).read_rows(0, spec.num_rows)
    for k in want:
        assert got[k].numpy().tobytes() == want[k].numpy().tobytes(), k


def test_credentials_never_reach_public_options() -> None:
    options = {
        "endpoint_url": "http://127.0.0.1:1",
        "key": "AKIA",
        "secret": "s",
        "token": "t",
        "client_kwargs": {
            "region_name": "x",
            "aws_secret_access_key": "s",
            "aws_access_key_id": "a",
        },
    }
    assert public_options(options) == {
        "endpoint_url": "http://127.0.0.1:1",
        "client_kwargs": {"region_name": "x"},
    }
