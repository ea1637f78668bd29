"""Compare training-efficiency methods on the same data and budget.

    python pipelines/compare.py --preset tiny --methods full mslt-cached stacking
    python pipelines/compare.py --preset tiny --methods full mslt-cached pld --budget_tokens 1e6

Writes runs/compare-<preset>/<method>/ (metrics.jsonl, final/ checkpoint, result.json) and
report.md with the table and the loss plots.
"""

from cached_mslt.compare import run_comparison
from cached_mslt.config import MethodArgs, parse_args


def main() -> None:
    args, (method,) = parse_args(extra=(MethodArgs,), description=__doc__)
    run_comparison(args, method)


if __name__ == "__main__":
    main()
