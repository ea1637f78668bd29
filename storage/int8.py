"""The 8-bit store dtype `int8`: each token's hidden vector as int8 with a power-of-two
scale (docs/cache-format.md, "8-bit stores").

A token's H values x become q = round(x / 2^e), with e the smallest integer such that
max|x| <= 127 * 2^e, so |q| <= 127; e is stored as one more int8 after the H values, so
the `hidden` array is int8 [N, T, H + 1] and plain numpy decodes it:
`u[..., :-1] * 2.0 ** u[..., -1:]`. Decoded values q * 2^e have at most 7 significant bits
and fit bfloat16 exactly, which is what a store hands the trainer.

Why a power of two: rounding is then idempotent (encoding a decoded token gives the same
bytes: max|q| lies in [64, 127], so e comes out the same), and a store's bytes stay one
function of its fingerprint whether a row was written from the frozen layers' output or
from its already rounded copy (docs/design.md, invariant 9). -128 never occurs in q (it is
the array's fill value: never written).
"""

from __future__ import annotations

import numpy as np
import torch

QMAX = 127
MIN_EXPONENT = -127  # an all-zero token's exponent (any would do: q is 0)
FILL = -128


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, e): int8 values [..., H] and int8 exponents [..., 1] of the tokens of `x`."""
    x = x.float()
    absmax = x.abs().amax(-1, keepdim=True)
    mantissa, exponent = torch.frexp(absmax / QMAX)  # absmax / 127 = m 2^k, m in [0.5, 1)
    e = torch.where(mantissa == 0.5, exponent - 1, exponent)  # ceil(log2(absmax / 127))
    e = torch.where(absmax > 0, e, MIN_EXPONENT).clamp(MIN_EXPONENT, QMAX)
    q = torch.round(torch.ldexp(x, -e)).clamp(-QMAX, QMAX)  # exact scaling by 2^-e
    return q.to(torch.int8), e.to(torch.int8)


def dequantize(q: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """q * 2^e in bfloat16 (exact: 7 significant bits, float32's exponent range)."""
    return torch.ldexp(q.float(), e.float()).to(torch.bfloat16)


def round_int8(x: torch.Tensor) -> torch.Tensor:
    """What a row of `x` reads back as from an int8 store (on `x`'s device)."""
    return dequantize(*quantize(x))


def encode(x: torch.Tensor) -> np.ndarray:
    """The stored array for `x` [..., H]: int8 [..., H + 1], the exponent last."""
    q, e = quantize(x.detach())
    return torch.cat([q, e], -1).cpu().numpy()


def decode(u: np.ndarray) -> torch.Tensor:
    """bfloat16 [..., H] from a stored int8 [..., H + 1] array."""
    t = torch.from_numpy(np.ascontiguousarray(u))
    return dequantize(t[..., :-1], t[..., -1:])


def round_to_store(hidden: torch.Tensor, rounding: torch.dtype | str) -> torch.Tensor:
    """`hidden` as a store of `StoreSpec.rounding` gives it back: cast to a 16/32-bit
    dtype, or int8-encoded and decoded."""
    return round_int8(hidden) if rounding == "int8" else hidden.to(rounding)
