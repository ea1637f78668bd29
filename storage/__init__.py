"""The activation store: a chunked Zarr cache of frozen-layer hidden states.

Knows nothing about models; see docs/cache-format.md for the on-disk format.
"""

from storage.dataset import BlockDataset, BlockSampler, make_block_loader
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
from storage.remote import check_reachable, public_options
from storage.spec import StoreSpec
from storage.store import ActivationStore

__all__ = [
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
    "public_options",
]
