"""Which mixed precision a run uses: the launcher's, unless `--mixed_precision` is given.

`accelerate launch --mixed_precision bf16`, an accelerate config file's `mixed_precision`
and `ACCELERATE_MIXED_PRECISION` all reach the script as that environment variable, and
`Accelerator()` reads it only when it is not given `mixed_precision` itself: an explicit
value always wins (docs/library-facts.md). So the run passes one only when the user asked
for one, and refuses two different requests instead of silently picking one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch
from accelerate.utils import parse_flag_from_env

from cached_mslt.config import ConfigError

LAUNCHER_VARIABLE = "ACCELERATE_MIXED_PRECISION"
SUPPORTED = ("no", "fp16", "bf16")
# mixed precision -> the dtype Accelerate's autocast computes in
AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
WHERE_LAUNCHER_SETS_IT = (
    "`accelerate launch --mixed_precision`, the accelerate config file's mixed_precision, "
    f"or {LAUNCHER_VARIABLE}"
)


def requested_precision(
    requested: str | None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The value to give `Accelerator(mixed_precision=...)`: `requested` (the run's
    `--mixed_precision`) or None to follow the launcher. ConfigError when both ask for
    different precisions. The launcher's "no" does not conflict: `accelerate launch`
    sets it when it was not asked for anything, so it cannot be told from a choice.
    `environ` defaults to the process environment as it is now (read at each call, as
    Accelerator reads it, not the mapping that was `os.environ` at import)."""
    environ = os.environ if environ is None else environ
    launcher = (environ.get(LAUNCHER_VARIABLE) or "").lower() or None
    if launcher is not None and launcher not in SUPPORTED:
        raise ConfigError(
            f"the launcher asks for mixed precision {launcher!r} ({WHERE_LAUNCHER_SETS_IT}); "
            f"expected one of {SUPPORTED}: relaunch with `accelerate launch --mixed_precision bf16`"
        )
    if requested is None or launcher in (None, "no", requested):
        return requested
    raise ConfigError(
        f"--mixed_precision {requested} conflicts with the launcher's mixed precision "
        f"{launcher} ({WHERE_LAUNCHER_SETS_IT}); ask in one place: drop --mixed_precision "
        f"{requested} (from the command or the --config file) to follow the launcher, or "
        f"launch with `accelerate launch --mixed_precision {requested}`"
    )


def effective_precision(requested: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The precision the Accelerator will use: the request, else the launcher's, else no."""
    environ = os.environ if environ is None else environ
    chosen = requested_precision(requested, environ)
    return chosen or (environ.get(LAUNCHER_VARIABLE) or "no").lower()


def on_cuda() -> bool:
    """Whether the run's Accelerator will put it on a CUDA device."""
    return torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")


def check_precision_supported(
    precision: str,
    cuda: bool,
    native_bf16: Callable[[], bool] = lambda: torch.cuda.is_bf16_supported(
        including_emulation=False
    ),
) -> None:
    """Refuse bf16 on a GPU without native bfloat16 (before Ampere): torch would emulate
    it, slower than float32, with no warning. CPUs run bf16 autocast natively or not at
    all, both correct (docs/levers.md measures it)."""
    if precision != "bf16" or not cuda or native_bf16():
        return
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    raise ConfigError(
        f"bf16 mixed precision was requested ({WHERE_LAUNCHER_SETS_IT}, or --mixed_precision) "
        f"but {name} (compute capability {major}.{minor}) has no native bfloat16; expected a "
        "GPU of compute capability 8.0 (Ampere) or newer. Launch with "
        "`accelerate launch --mixed_precision fp16` (or no) instead"
    )


def autocast_dtype(mixed_precision: str) -> str:
    """The dtype the frozen layers compute in under the run's mixed precision."""
    return AUTOCAST_DTYPES.get(mixed_precision, "float32")
