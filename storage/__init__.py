"""The activation store: a chunked Zarr cache of frozen-layer hidden states.

Knows nothing about models; see docs/cache-format.md for the on-disk format.
"""

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
from storage.loopback import loopback_s3
from storage.remote import check_reachable, is_remote, public_options, with_timeouts
from storage.spec import CODECS, DTYPES, StoreSpec
from storage.store import ActivationStore
from storage.synthetic import synthetic_rows, write_synthetic_shards

__all__ = [
    "Blocks",
    "CODECS",
    "DTYPES",
    "loopback_s3",
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
    "public_options",
    "with_timeouts",
]
