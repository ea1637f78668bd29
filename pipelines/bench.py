"""Benchmarks: one JSON object per line, `{"name", "value", "unit", ...}` plus `model_ratio`
where the cost model of docs/design.md predicts the figure. Measures, never asserts.

    python pipelines/bench.py --quick          # every figure of docs/benchmarks.md (tiny and
                                               # mini), 1.5-2.5 minutes on an idle 2-core machine
    python pipelines/bench.py                  # the same with longer time caps and bigger stores
    python pipelines/bench.py --peak_tflops 312  # MFU against a given peak, not a measured matmul
    python pipelines/bench.py --quick --s3     # plus stores on an S3 API on loopback (moto)
    python pipelines/bench.py --data           # data preparation only: 2 GB under 3 GiB (docs/data.md)
    python pipelines/bench.py --variants precision --preset tiny   # the trainer's step in
                                               # float32, bf16 and compiled (minutes: compiling)
    python pipelines/bench.py --variants stage --preset tiny --steps 12 --rounds 3
                                               # a real stage against the bench step
    python pipelines/bench.py --variants write-through --preset tiny  # write-through's step
                                               # (rows stored / missing) vs cached / live
    python pipelines/bench.py --variants loader --s3  # the loader in GB/s at bert-base rows:
                                               # page cache, cold, S3 loopback; 0/2/4 workers
    python pipelines/bench.py --variants classifier  # fine-tuning's step: the [CLS]-only
                                               # last layer against the whole one
    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 \
        pipelines/bench.py --variants stage --batch_size 4   # ... at make run's shape (DDP)
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from cached_mslt.bench import (
    ROOT,
    all_benchmarks,
    classifier_benchmarks,
    data_benchmarks,
    loader_benchmarks,
    precision_benchmarks,
    stage_vs_bench,
    write_through_benchmarks,
)
from cached_mslt.training import keep_freed_memory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short time caps and small stores (1.5-2.5 minutes idle)",
    )
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="MFU reference (dense TFLOP/s); default: an fp32 matmul measured in the same rounds",
    )
    parser.add_argument(
        "--s3", action="store_true", help="also stores on a loopback S3 API (dev extra: moto)"
    )
    parser.add_argument(
        "--reuse_host_memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="freed host memory kept, as a run does by default (--no-reuse_host_memory: "
        "glibc's default; docs/levers.md, host memory)",
    )
    add_data_args(parser.add_argument_group("data preparation (--data)"))
    add_variant_args(parser.add_argument_group("the trainer's step (--variants)"))
    return parser


def add_data_args(data: argparse._ArgumentGroup) -> None:
    data.add_argument("--data", action="store_true", help="only the data-preparation benchmark")
    data.add_argument("--data_bytes", type=float, default=2e9, help="synthetic corpus size")
    data.add_argument("--data_procs", type=int, nargs="+", default=[1, 2], help="--num_proc values")
    data.add_argument("--data_limit_gib", type=float, default=3.0, help="RLIMIT_AS; 0: none")
    data.add_argument("--data_dir", default=None, help="scratch folder (default: system temp)")
    data.add_argument(
        "--data_repo", default=str(ROOT), help="a checkout whose prepare_data.py to measure"
    )


def add_variant_args(variants: argparse._ArgumentGroup) -> None:
    variants.add_argument(
        "--variants",
        nargs="+",
        choices=["precision", "stage", "write-through", "loader", "classifier"],
        default=None,
        help="only these: the trainer's step in float32/bf16/compiled; a stage vs the bench "
        "step; write-through's step (rows stored / missing) vs the cached / live step; the "
        "loader in bytes at bert-base rows; fine-tuning's step with the [CLS]-only last layer",
    )
    variants.add_argument("--preset", default="tiny", help="the shape the variants run at")
    variants.add_argument(
        "--repeats", type=int, default=5, help="precision, classifier: interleaved rounds"
    )
    variants.add_argument(
        "--device", default="cpu", help="precision: where the step runs (cuda: on the GPU)"
    )
    variants.add_argument("--steps", type=int, default=30, help="stage: steps per phase run")
    variants.add_argument("--rounds", type=int, default=3, help="stage: stage/bench alternations")
    variants.add_argument(
        "--batch_size", type=int, default=32, help="stage: sequences per step and process"
    )


def selected_benchmarks(args: argparse.Namespace) -> list[dict]:
    """The figures the flags ask for: data preparation, the step's variants, or all the rest."""
    if args.data:
        limit = int(args.data_limit_gib * 2**30)
        return data_benchmarks(
            args.data_dir, int(args.data_bytes), tuple(args.data_procs), limit, Path(args.data_repo)
        )
    if args.variants:
        figures = []
        if "precision" in args.variants:
            figures += precision_benchmarks(args.preset, repeats=args.repeats, device=args.device)
        if "stage" in args.variants:
            figures += stage_vs_bench(
                args.preset, steps=args.steps, rounds=args.rounds, batch_rows=args.batch_size
            )
        if "write-through" in args.variants:
            figures += write_through_benchmarks(args.preset)
        if "loader" in args.variants:
            figures += loader_benchmarks(args.quick, s3=args.s3)
        if "classifier" in args.variants:
            figures += classifier_benchmarks(repeats=args.repeats)
        return figures
    return all_benchmarks(quick=args.quick, s3=args.s3, peak_tflops=args.peak_tflops)


def main() -> None:
    args = build_parser().parse_args()
    # As a run does unless --no_reuse_host_memory (TrainArgs).
    reuse = args.reuse_host_memory and keep_freed_memory()
    began = time.perf_counter()
    machine = {
        "machine": platform.machine(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        # other processes' load when the run started: absolute rates hold only for it
        "load_avg_1m_at_start": os.getloadavg()[0],
        "reuse_host_memory": reuse,
    }
    figures = selected_benchmarks(args)
    figures.append(
        {
            "name": "bench_wall_s",
            "value": time.perf_counter() - began,
            "unit": "s",
            "load_avg_at_end": os.getloadavg(),
        }
    )
    if int(os.environ.get("RANK", "0")) == 0:  # under `accelerate launch`, one copy
        for figure in figures:
            print(json.dumps({**figure, **machine}), flush=True)


if __name__ == "__main__":
    main()
