"""The rates `pipelines/plan.py` prices a run with, measured on this machine in CPU seconds
of this process (docs/scaling.md, "Planning a run": the machine is shared, and CPU time of
a one-thread process measures only its own work).

- a training step of the top `trained` layers over `frozen` cached ones (the trainer's step,
  `trainer_step`), at the run's batch: FLOP/s by the cost model's count;
- a no-grad forward of `trained` layers at the same batch (what live and write-through
  steps add per frozen layer);
- a write-through unit's write (`write_shard` of one chunk of `block_rows` rows) and a
  shuffled epoch of the block loader over those units: store bytes/s.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable

import torch

from cached_mslt.bench.steps import cached_case, run_shape, trainer_step
from cached_mslt.models import run_layers
from cached_mslt.stages import block_rows_for
from cached_mslt.training import keep_freed_memory, layer_forward_flops, step_flops
from storage import ActivationStore, BlockDataset, StoreSpec, make_block_loader, synthetic_rows


def cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    """CPU seconds per call of `fn`, after one untimed call."""
    fn()
    began = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - began) / repeats


def compute_rates(preset: str, batch_rows: int, frozen: int = 3, trained: int = 3) -> dict:
    """TFLOP/s of the cached training step and of a frozen forward, per CPU second."""
    model, data, hidden16 = cached_case(preset, frozen, batch_rows, layers=frozen + trained)
    top = {"labels": data["labels"], "attention_mask": data["attention_mask"]}
    _, mask_prob = run_shape(preset)
    step = trainer_step(
        model, frozen, lambda: {**top, "hidden_states": hidden16.float()}, mask_prob=mask_prob
    )
    config, (rows, seq_len) = model.config, data["labels"].shape
    flops = step_flops(
        config,
        tokens=rows * seq_len,
        masked_tokens=int((data["labels"] != -100).sum()),
        trained_layers=trained,
        frozen_live_layers=0,
        seq_len=seq_len,
        decoder_weight_trains=False,
    )
    train_s = cpu_seconds(step, 10)
    hidden = hidden16.float()

    @torch.no_grad()
    def forward() -> None:
        run_layers(model, hidden, None, frozen, frozen + trained)

    forward_s = cpu_seconds(forward, 10)
    forward_flops = trained * rows * seq_len * layer_forward_flops(config, seq_len)
    return {
        "train_tflops": flops / train_s / 1e12,
        "forward_tflops": forward_flops / forward_s / 1e12,
    }


def store_rates(preset: str, batch_rows: int, units: int = 64) -> dict:
    """GB/s of writing write-through units and of reading them back through the loader."""
    from cached_mslt.config import PRESETS

    block = block_rows_for(batch_rows)
    spec = StoreSpec(
        num_rows=units * block,
        seq_len=PRESETS[preset]["seq_len"],
        hidden_size=PRESETS[preset]["hidden_size"],
        rows_per_chunk=block,
        chunks_per_shard=1,
    )
    rows = synthetic_rows(spec, 0, spec.num_rows)
    # stored bytes, as the cost model counts them: int8 mask and int32 labels, not int64
    nbytes = spec.num_rows * (spec.row_bytes + 5 * spec.seq_len + 8) / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        store = ActivationStore.create(f"{tmp}/s", spec, fingerprint={"bench": "rates"})
        began = time.process_time()
        for unit in range(store.num_shards):
            a, b = store.shard_rows(unit)
            store.write_shard(unit, **{k: v[a:b] for k, v in rows.items()})
        write_s = time.process_time() - began
        store.commit()
        loader = make_block_loader(
            BlockDataset(ActivationStore.open(f"{tmp}/s"), block_rows=block),
            rows_per_batch=batch_rows,
            shuffle=True,
            seed=0,
        )
        read_s = cpu_seconds(lambda: sum(len(b["labels"]) for b in loader), 3)
    return {"write_gbps": nbytes / write_s, "read_gbps": nbytes / read_s}


def measure_rates(preset: str, batch_rows: int, reuse_host_memory: bool = True) -> dict:
    """Everything `pipelines/plan.py --measure` prints, for one process on this machine,
    with host memory kept for reuse as a run keeps it (`--reuse_host_memory`)."""
    if reuse_host_memory:
        keep_freed_memory()
    return {
        **compute_rates(preset, batch_rows),
        **store_rates(preset, batch_rows),
        "threads": torch.get_num_threads(),
    }
