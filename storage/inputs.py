"""Checking and converting what `write_shard` is given: exact dtypes, exact shapes.

Nothing is cast silently where a cast could change a value: hidden states must already
be in the store's dtype; integer arrays may arrive in any integer dtype, and are
narrowed only after a range check.
"""

from __future__ import annotations

import numpy as np
import torch

from storage.errors import NonFiniteActivationsError, StoreWriteError
from storage.int8 import encode
from storage.spec import StoreSpec

INT_DTYPES = {"attention_mask": np.uint8, "labels": np.int32, "row_index": np.int64}
# Values each integer array may hold; the fill values (layout.INT_FILLS) lie outside.
INT_RANGES = {
    "attention_mask": (0, 1),
    "labels": (int(np.iinfo(np.int32).min) + 1, int(np.iinfo(np.int32).max)),
    "row_index": (0, int(np.iinfo(np.int64).max)),
}


def hidden_to_numpy(
    x: torch.Tensor | np.ndarray, spec: StoreSpec, shape: tuple[int, ...], where: str
) -> np.ndarray:
    """The array to store for `hidden`: bfloat16 as its raw bits in uint16; int8 encoded
    from any floating tensor (storage/int8.py), after a finiteness check."""
    if spec.dtype == "int8":
        return int8_to_numpy(x, shape, where)
    if isinstance(x, torch.Tensor):
        if x.dtype != spec.torch_dtype:
            raise StoreWriteError(
                f"{where}: hidden has dtype {x.dtype}, the store holds {spec.dtype}; convert "
                f"explicitly (no silent casts)"
            )
        x = x.detach().cpu().contiguous()
        arr = x.view(torch.uint16).numpy() if spec.dtype == "bfloat16" else x.numpy()
    elif isinstance(x, np.ndarray):
        if spec.dtype == "bfloat16" or x.dtype != np.dtype(spec.storage_dtype):
            want = "a torch.bfloat16 tensor" if spec.dtype == "bfloat16" else spec.dtype
            raise StoreWriteError(
                f"{where}: hidden has dtype {x.dtype}, expected {want}; convert explicitly "
                f"(no silent casts)"
            )
        arr = x
    else:
        raise StoreWriteError(
            f"{where}: hidden must be a torch.Tensor or numpy array, got {type(x).__name__}"
        )
    if arr.shape != shape:
        raise StoreWriteError(f"{where}: hidden has shape {tuple(arr.shape)}, expected {shape}")
    check_finite(arr, spec, where)
    return arr


def int8_to_numpy(x: torch.Tensor, shape: tuple[int, ...], where: str) -> np.ndarray:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise StoreWriteError(
            f"{where}: an int8 store encodes hidden from a floating torch.Tensor, got "
            f"{type(x).__name__} {getattr(x, 'dtype', '')}"
        )
    if tuple(x.shape) != shape:
        raise StoreWriteError(f"{where}: hidden has shape {tuple(x.shape)}, expected {shape}")
    x = x.detach().cpu()
    bad = ~torch.isfinite(x)
    if bad.any():
        first_row = int(bad.reshape(len(x), -1).any(1).nonzero()[0, 0])
        raise NonFiniteActivationsError(
            f"{where}: refused {int(bad.sum())} non-finite values (NaN or inf; first in row "
            f"{first_row} of the shard). A store never holds them: retrain the stage that "
            f"produced those weights with a lower learning rate; this shard stays not-done."
        )
    return encode(x)


# Exponent bits of each stored dtype (bfloat16 as its raw bits in uint16): all ones is
# inf or NaN, anything else is finite.
EXPONENT_MASKS = {"float16": 0x7C00, "bfloat16": 0x7F80, "float32": 0x7F800000}


def check_finite(arr: np.ndarray, spec: StoreSpec, where: str) -> None:
    """Refuse NaN/inf before a shard is written.

    Exact, on the bits: a value is NaN or inf iff its exponent bits are all ones, i.e. its
    bits without the sign are >= the exponent mask. Read as signed ints only positive
    values can reach that; read as unsigned only negative ones can reach sign | mask. So
    two max reductions over views, with no temporary array, decide it (float16, 64 MiB:
    ~5 ms, against ~50 ms for `~np.isfinite`); the exact mask is built only to report."""
    mask = EXPONENT_MASKS[spec.dtype]
    bits = arr.dtype.itemsize * 8
    signed = arr.view(f"int{bits}")
    unsigned = arr.view(f"uint{bits}")
    if not arr.size or (
        int(signed.max()) < mask and int(unsigned.max()) < (1 << (bits - 1)) | mask
    ):
        return
    bad = (unsigned & mask) == mask
    first_row = int(np.argwhere(bad.reshape(bad.shape[0], -1).any(axis=1))[0][0])
    raise NonFiniteActivationsError(
        f"{where}: refused {int(bad.sum())} non-finite values (NaN or inf; first in row "
        f"{first_row} of the shard). A store never holds them: the weights that computed "
        f"these activations have diverged. Retrain the stage that produced those weights "
        f"with a lower learning rate; this shard stays not-done."
    )


def ints_to_numpy(
    name: str, x: torch.Tensor | np.ndarray, shape: tuple[int, ...], where: str
) -> np.ndarray:
    """The array to store for an integer array, in its storage dtype."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype.kind not in "biu":
        raise StoreWriteError(f"{where}: {name} has dtype {arr.dtype}, expected an integer dtype")
    if arr.shape != shape:
        raise StoreWriteError(f"{where}: {name} has shape {arr.shape}, expected {shape}")
    lo, hi = INT_RANGES[name]
    if arr.size and (int(arr.min()) < lo or int(arr.max()) > hi):
        raise StoreWriteError(
            f"{where}: {name} has values in [{arr.min()}, {arr.max()}], expected within [{lo}, {hi}]"
        )
    return arr.astype(INT_DTYPES[name], copy=False)  # lossless after the range check
