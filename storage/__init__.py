"""The activation store: a chunked Zarr cache of frozen-layer hidden states.

Knows nothing about models; see docs/cache-format.md for the on-disk format.
"""

from storage.bandwidth import Bandwidth, probe_bandwidth
from storage.dataset import BlockDataset, Blocks, BlockSampler, make_block_loader
from storage.errors import (
    CorruptStoreError,
    IncompleteStoreError,
    NonFiniteActivationsError,
    StaleStoreError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    StoreSpecError,
    StoreUnreachableError,
    StoreWriteError,
)
from storage.fingerprint import fingerprint_dict, fingerprint_file_tree, fingerprint_module
from storage.int8 import round_to_store
from storage.remote import check_reachable, is_remote, public_options, with_timeouts
from storage.spec import CODECS, DTYPES, StoreSpec
from storage.store import ActivationStore
from storage.synthetic import synthetic_rows, write_synthetic_shards

__all__ = [
    "Bandwidth",
    "probe_bandwidth",
    "Blocks",
    "CODECS",
    "DTYPES",
    "loopback_s3",
    "loopback_s3_process",
    "synthetic_rows",
    "write_synthetic_shards",
    "ActivationStore",
    "BlockDataset",
    "BlockSampler",
    "CorruptStoreError",
    "IncompleteStoreError",
    "NonFiniteActivationsError",
    "StaleStoreError",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreSpec",
    "StoreSpecError",
    "StoreUnreachableError",
    "StoreWriteError",
    "check_reachable",
    "fingerprint_dict",
    "fingerprint_file_tree",
    "fingerprint_module",
    "make_block_loader",
    "is_remote",
    "make_bucket",
    "public_options",
    "round_to_store",
    "with_timeouts",
]

# The two modules that are also commands (`python -m storage.loopback`, `python -m
# storage.bucket`) load on first use: imported here, runpy would warn that the module it
# runs was already imported.
COMMAND_MODULES = {
    "loopback_s3": "storage.loopback",
    "loopback_s3_process": "storage.loopback",
    "make_bucket": "storage.bucket",
}


def __getattr__(name: str):
    if name in COMMAND_MODULES:
        import importlib

        return getattr(importlib.import_module(COMMAND_MODULES[name]), name)
    raise AttributeError(f"module 'storage' has no attribute {name!r}")
