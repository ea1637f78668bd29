"""Run every stage of the plan, then write the summary table and the loss plot.

`python pipelines/pretrain.py --preset tiny` or `accelerate launch pipelines/pretrain.py ...`.
Finished stages are skipped and an interrupted one resumes, so re-running continues a run.
"""

import sys

from cached_mslt.config import parse_args
from cached_mslt.stages import run_all
from storage import StoreUnreachableError


def main() -> None:
    args, _ = parse_args(description=__doc__)
    try:
        run_all(args)
    except StoreUnreachableError as e:  # a message, not a traceback: nothing ran yet
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
