"""Compare training-efficiency methods on the same data and budget.

    python pipelines/compare.py --preset tiny --methods full mslt-cached stacking
    python pipelines/compare.py --preset tiny --methods full mslt-cached pld --budget_tokens 1e6
    python pipelines/compare.py --preset tiny --finetune --task sentiment bbc --seeds 0 1 2

Writes runs/compare-<preset>/<method>/ (metrics.jsonl, final/ checkpoint, result.json) and
report.md with the table and the loss plots.
"""

from cached_mslt.config import MethodArgs, parse_args
from cached_mslt.evaluation import FinetuneArgs
from cached_mslt.methods import run_comparison
from cached_mslt.training import leave_process_group


def main() -> None:
    args, (method, finetune_args) = parse_args(
        extra=(MethodArgs, FinetuneArgs), description=__doc__
    )
    run_comparison(args, method, finetune_args)
    leave_process_group()


if __name__ == "__main__":
    main()
