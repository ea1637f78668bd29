"""MSLT stages: the stage plan, running one stage (grow, freeze, cache or live, train,
save), the run's contract, building or filling a stage's activation store (eager,
write-through) and the end-of-run summary.

Imports `config`, `rundir`, `data`, `models`, `training`, `storage`.
"""

from cached_mslt.stages.cache import CacheRequest, build_cache, frozen_output
from cached_mslt.stages.contract import StageError, write_run_config
from cached_mslt.stages.plan import StagePlan
from cached_mslt.stages.planner import format_plan, make_plan, model_shape, plan_rates
from cached_mslt.stages.runner import (
    UNBOUNDED_STEPS,
    USER_ERRORS,
    block_rows_for,
    make_accelerator,
    run_all,
    run_block_rows,
    run_stage,
    train_rows,
)
from cached_mslt.stages.summary import write_run_summary
from cached_mslt.stages.write_through import Pending, UnitWriter, WriteThrough, WriteThroughBlocks

__all__ = [
    "CacheRequest",
    "StageError",
    "StagePlan",
    "Pending",
    "UNBOUNDED_STEPS",
    "USER_ERRORS",
    "UnitWriter",
    "WriteThrough",
    "WriteThroughBlocks",
    "block_rows_for",
    "build_cache",
    "format_plan",
    "frozen_output",
    "make_accelerator",
    "make_plan",
    "model_shape",
    "plan_rates",
    "run_all",
    "run_block_rows",
    "run_stage",
    "train_rows",
    "write_run_config",
    "write_run_summary",
]
