"""Host memory for training steps: freed blocks are kept for the next step instead of
being returned to the operating system.

glibc's malloc serves every block above its largest mmap threshold (32 MiB on 64-bit)
with a fresh `mmap` and unmaps it on free. A CPU training step allocates such blocks
every time (the MLM head's [masked tokens, vocabulary] logits and log-probabilities,
52 MB each at tiny's run shape), so each step's pages come back new and the kernel faults
in and zeroes them again: 29,266 minor faults and 50 ms of system time per tiny step
here; without them the step ran 1.15x faster in alternating processes (docs/levers.md,
host memory). With `mmap` off and trimming off, the heap keeps those blocks and the next
step reuses them, as CUDA's caching allocator does for device memory. The cost: the
process holds its peak heap until it exits. On by default (`--no_reuse_host_memory` turns
it off): a write-through stage at 2 epochs faulted in 3.4M pages without it and 0.12M with
it, and stages 2-4 ran 11-22% fewer CPU seconds in every cache mode (docs/levers.md, host
memory). Linux with glibc only; elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make this process's malloc keep freed memory for reuse (process-wide, for every
    later allocation). Returns whether it applied (False off glibc)."""
    if platform.system() != "Linux":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # absent on musl and other libcs
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
