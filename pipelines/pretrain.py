"""Run every stage of the plan, then write the summary table and the loss plot.

`python pipelines/pretrain.py --preset tiny` or `accelerate launch pipelines/pretrain.py ...`.
Finished stages are skipped and an interrupted one resumes, so re-running continues a run.
"""

import sys

from cached_mslt.config import parse_args
from cached_mslt.stages import USER_ERRORS, run_all


def main() -> None:
    try:
        args, _ = parse_args(description=__doc__)
        run_all(args)
    except USER_ERRORS as e:  # a message that says what to run, not a traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
