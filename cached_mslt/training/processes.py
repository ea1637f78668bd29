"""The end of a distributed process's life, in one place.

A process that exits with its gloo process group still alive can abort in the C++
teardown with "terminate called without an active exception": gloo's worker threads still
hold work when the interpreter finalises (pytorch/pytorch#190489; seen here as a rare
failure of a two-rank test, docs/reliability.md). So every entry point that may run under
`accelerate launch` leaves the group once its work is done. Only on success: after a
failure, a collective shutdown could wait forever on a rank that is still inside a
collective (torchtitan#1342), and the launcher tears the ranks down anyway.
"""

from __future__ import annotations

import torch.distributed as dist


def leave_process_group() -> None:
    """Destroy the default process group if this process is in one (a no-op otherwise, so
    one-process runs and repeated calls are safe)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
