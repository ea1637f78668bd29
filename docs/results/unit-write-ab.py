"""A/B of one write-through unit's write (tiny: 8 rows x 128 x 128), the previous code path
against write_shard, alternated in rounds so both see the same load."""

import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from storage import ActivationStore, StoreSpec
from storage.shards import encode_shard

dtype = sys.argv[1] if len(sys.argv) > 1 else "float16"
R, T, H, N = 8, 128, 128, 4000
spec = StoreSpec(
    num_rows=R * N, seq_len=T, hidden_size=H, dtype=dtype, rows_per_chunk=R, chunks_per_shard=1
)
root = tempfile.mkdtemp()
st = {
    k: ActivationStore.create(f"{root}/{k}", spec, fingerprint={"frozen_layers": 3}) for k in "ab"
}
h = torch.randn(R, T, H).to(spec.torch_dtype)
rows = dict(
    hidden=h, attention_mask=torch.ones(R, T, dtype=torch.long), labels=torch.full((R, T), -100)
)


def previous(s, u):  # the code before this change: a sync call per array, Zarr's marker setitem
    assert not s.is_complete
    a, b = s.shard_rows(u)
    data = {
        "hidden": h.numpy() if dtype != "bfloat16" else h.view(torch.uint16).numpy(),
        "attention_mask": rows["attention_mask"].numpy().astype(np.uint8),
        "labels": rows["labels"].numpy().astype(np.int32),
        "row_index": np.arange(a, b),
    }
    keys = s._shard_keys(u)
    for name, v in data.items():
        meta = s._writers[name].metadata
        enc = encode_shard(
            v.astype(meta.dtype.to_native_dtype(), copy=False),
            rows_per_chunk=R,
            chunks_per_shard=1,
            fill_value=meta.fill_value,
        )
        sync(s._store.set(keys[name], default_buffer_prototype().buffer.from_array_like(enc)))
    s._markers[u] = 1


def current(s, u):
    s.write_shard(u, **rows, row_index=torch.arange(*s.shard_rows(u)))


times = {"previous": [], "current": []}
u = 0
for _round in range(8):
    for name, fn, s in (("previous", previous, st["a"]), ("current", current, st["b"])):
        t = time.process_time()
        for k in range(100):
            fn(s, u + k)
        times[name].append((time.process_time() - t) / 100 * 1e3)
    u += 100
for name, v in times.items():
    print(
        f"{name}: median {statistics.median(v):.2f} ms CPU per unit (min {min(v):.2f}, max {max(v):.2f}, {len(v)} rounds of 100)"
    )
print(
    "ratio previous/current per round:",
    [round(a / b, 2) for a, b in zip(times["previous"], times["current"])],
)
