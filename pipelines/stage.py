"""Run one MSLT stage: `accelerate launch pipelines/stage.py --config CFG --stage K`.

Refuses if stage K-1 is not finished, resumes K if it was interrupted, does nothing if
K is done. Every process builds its share of the cache, then all train the top; then
summary.md and val_loss.png of the stages finished so far are written.
"""

import sys
from dataclasses import dataclass, field

from cached_mslt.config import parse_args
from cached_mslt.stages import USER_ERRORS, run_stage, write_run_summary
from cached_mslt.training import leave_process_group


@dataclass
class StageArgs:
    stage: int = field(metadata={"help": "1-based stage index of the plan"})
    rebuild_cache: bool = field(
        default=False,
        metadata={
            "help": "build the stage's store anew (stale or corrupt); a finished stage "
            "rebuilds only its store"
        },
    )


def main() -> None:
    try:
        args, (stage_args,) = parse_args(extra=(StageArgs,), description=__doc__)
        run_stage(args, stage_args.stage, rebuild_cache=stage_args.rebuild_cache)
        write_run_summary(args)
        leave_process_group()
    except USER_ERRORS as e:  # a message that says what to run, not a traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
