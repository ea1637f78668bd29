"""The one training loop (`train_phase`) and what it needs: budgets, step counts read
without waiting for the device, mid-phase checkpoints, metrics and the run clock, the FLOP
count of the cost model.

Imports `config`, `rundir`, `models`, `storage`; knows no stage plan and no method.
"""

from cached_mslt.training.budget import (
    MEASURES,
    MIN_TRAINED_SHARE,
    Budget,
    PhaseShare,
    share_of_flops,
)
from cached_mslt.training.checkpointing import OldCheckpointError
from cached_mslt.training.flops import (
    SQUARE,
    Peak,
    ffn_shape,
    gpu_peak,
    layer_forward_flops,
    matmul_flops_per_s,
    run_peak,
    step_flops,
)
from cached_mslt.training.host_memory import keep_freed_memory
from cached_mslt.training.metrics import (
    MetricsWriter,
    RunClock,
    Stopwatch,
    below_unigram,
    clock_fields,
    markdown_table,
    plot_curves,
    read_metrics,
    stage_speeds,
)
from cached_mslt.training.processes import leave_process_group
from cached_mslt.training.step_counts import host_batch, padded_gather_per_row
from cached_mslt.training.trainer import DivergenceError, Phase, train_phase, validation_loss

__all__ = [
    "Budget",
    "DivergenceError",
    "MEASURES",
    "MIN_TRAINED_SHARE",
    "MetricsWriter",
    "OldCheckpointError",
    "Peak",
    "Phase",
    "PhaseShare",
    "RunClock",
    "SQUARE",
    "Stopwatch",
    "below_unigram",
    "clock_fields",
    "ffn_shape",
    "gpu_peak",
    "host_batch",
    "keep_freed_memory",
    "layer_forward_flops",
    "leave_process_group",
    "markdown_table",
    "matmul_flops_per_s",
    "padded_gather_per_row",
    "plot_curves",
    "read_metrics",
    "run_peak",
    "share_of_flops",
    "stage_speeds",
    "step_flops",
    "train_phase",
    "validation_loss",
]
