"""Benchmarks: one JSON object per line, `{"name", "value", "unit", ...}` plus `model_ratio`
where the cost model of docs/design.md predicts the figure. Measures, never asserts.

    python pipelines/bench.py --quick          # tiny preset, under 5 minutes on 2 cores
    python pipelines/bench.py                  # tiny and mini, bert-base storage shapes
    python pipelines/bench.py --quick --s3     # plus stores on an S3 API on loopback (moto)
"""

import argparse
import json
import platform

import torch

from cached_mslt.bench import all_benchmarks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny preset only")
    parser.add_argument(
        "--s3", action="store_true", help="also stores on a loopback S3 API (dev extra: moto)"
    )
    args = parser.parse_args()
    machine = {
        "machine": platform.machine(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    for figure in all_benchmarks(quick=args.quick, s3=args.s3):
        print(json.dumps({**figure, **machine}), flush=True)


if __name__ == "__main__":
    main()
