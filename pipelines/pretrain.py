"""Run every stage of the plan, then write the summary table and the loss plot.

`python pipelines/pretrain.py --preset tiny` or `accelerate launch pipelines/pretrain.py ...`.
Finished stages are skipped and an interrupted one resumes, so re-running continues a run.
"""

from cached_mslt.config import parse_args
from cached_mslt.stages import run_all


def main() -> None:
    args, _ = parse_args(description=__doc__)
    run_all(args)


if __name__ == "__main__":
    main()
