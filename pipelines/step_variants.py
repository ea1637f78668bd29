"""The trainer's step in float32, bf16 autocast and compiled, and a real stage against the
benchmark step of its shape (cached_mslt/step_variants.py). JSON lines, like bench.py.

    python pipelines/step_variants.py --preset tiny
    python pipelines/step_variants.py --preset tiny --only stage --steps 12 --rounds 2
"""

import argparse
import json
import os

import torch

from cached_mslt.step_variants import precision_benchmarks, stage_vs_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--only", choices=["precision", "stage"], default=None)
    parser.add_argument("--repeats", type=int, default=5, help="precision: interleaved rounds")
    parser.add_argument("--steps", type=int, default=30, help="stage: steps of each phase run")
    parser.add_argument("--rounds", type=int, default=3, help="stage: phase/bench alternations")
    args = parser.parse_args()
    machine = {"threads": torch.get_num_threads(), "load": os.getloadavg()[0]}
    figures = []
    if args.only in (None, "precision"):
        figures += precision_benchmarks(args.preset, repeats=args.repeats)
    if args.only in (None, "stage"):
        figures += stage_vs_bench(args.preset, steps=args.steps, rounds=args.rounds)
    for figure in figures:
        print(json.dumps({**figure, **machine}))


if __name__ == "__main__":
    main()
