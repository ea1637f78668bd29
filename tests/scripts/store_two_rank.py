"""Two real ranks (gloo on the CPU) build one store, then read it through accelerate.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no tests/scripts/store_two_rank.py URL OUT_JSON

Rank 0 creates, everyone opens r+ and writes its pending shards, rank 0 commits; then each
rank iterates an `accelerator.prepare`d block loader for two epochs and rank 0 writes
what every rank saw to OUT_JSON for the test to check.
"""

from __future__ import annotations

import json
import sys

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object

from storage import (
    ActivationStore,
    BlockDataset,
    BlockSampler,
    StoreSpec,
    make_block_loader,
)
from storage.synthetic import synthetic_rows

# 6 shards of 12 rows, the last one 4 rows; 16 blocks of 4 rows
SPEC = StoreSpec(
    num_rows=64, seq_len=8, hidden_size=16, dtype="bfloat16", rows_per_chunk=4, chunks_per_shard=3
)
FP = {"weights": "w0", "data": "d0"}
ROWS_PER_BATCH = 8  # 2 blocks per batch -> 8 batches, 4 per rank: every row exactly once


def main() -> None:
    url, out = sys.argv[1], sys.argv[2]
    # Accelerator() first: it is what reads ACCELERATE_USE_CPU; a bare PartialState() on a
    # machine without GPUs stays single-process (DistributedType.NO) even under launch.
    accelerator = Accelerator()
    state = PartialState()
    assert state.num_processes == 2, f"expected 2 processes, got {state.num_processes}"
    rank, world = state.process_index, state.num_processes

    if state.is_main_process:
        ActivationStore.create(url, SPEC, fingerprint=FP)
    state.wait_for_everyone()
    store = ActivationStore.open(url, mode="r+", expected_fingerprint=FP)
    written = store.pending_shards(rank, world)
    for shard in written:
        store.write_shard(shard, **synthetic_rows(SPEC, *store.shard_rows(shard)))
    state.wait_for_everyone()
    if state.is_main_process:
        store.commit()
    state.wait_for_everyone()

    reader = ActivationStore.open(url, expected_fingerprint=FP)
    got, want = reader.read_rows(0, SPEC.num_rows), synthetic_rows(SPEC, 0, SPEC.num_rows)
    got["hidden"], want["hidden"] = (
        got["hidden"].view(torch.int16),
        want["hidden"].view(torch.int16),
    )
    rows_ok = all(torch.equal(got[k], want[k]) for k in want)  # bit-exact, NaN included

    dataset = BlockDataset(reader)
    loader = accelerator.prepare(
        make_block_loader(dataset, rows_per_batch=ROWS_PER_BATCH, shuffle=True, seed=3)
    )
    seen = {}
    for epoch in range(2):
        loader.set_epoch(epoch)
        seen[epoch] = [b["row_index"].tolist() for b in loader]
    report = {"rank": rank, "written": written, "rows_ok": rows_ok, "batches": seen}
    everyone = gather_object([report])
    if state.is_main_process:
        sampler = BlockSampler(len(dataset), shuffle=True, seed=3)
        orders = {}
        for epoch in range(2):
            sampler.set_epoch(epoch)
            orders[epoch] = list(sampler)
        with open(out, "w") as f:
            json.dump(
                {"ranks": everyone, "block_orders": orders, "complete": reader.is_complete}, f
            )
    state.wait_for_everyone()
    accelerator.end_training()  # leaves the process group (cached_mslt/training/processes.py)


if __name__ == "__main__":
    main()
