"""Price a run before it runs: per stage tokens/s, step times live and cached, the store's
build or fill, bytes written and read, compute- or I/O-bound, wall time and the choice
`--cache auto` makes; totals for live MSLT, cached MSLT and the full model
(docs/scaling.md, "Planning a run").

    python pipelines/plan.py --config configs/bert-base-8gpu.yaml --corpus_tokens 4.3e9 \\
        --gpu A100 --gpus 8 --read_gbps 8 --write_gbps 4
    python pipelines/plan.py --preset bert-base --corpus_tokens 4.3e9 --views 10 \\
        --stage_tokens 8e9 --peak_tflops 312 --mfu 0.2 --gpus 8 --read_gbps 8 --write_gbps 4
    OMP_NUM_THREADS=1 python pipelines/plan.py --preset tiny --train_examples 1024 \\
        --stage_steps 32,128,128,128 --measure --io_overlap false      # this machine

The model, plan, views, batch and store dtype are a run's own options (`--config` takes a
run's config.json or a recipe in configs/); compute rates are per process, store bandwidths
over all processes.
"""

import dataclasses
import json
import sys

from cached_mslt.config import PlanArgs, parse_args
from cached_mslt.stages import USER_ERRORS, format_plan, make_plan


def main() -> None:
    try:
        args, (plan,) = parse_args(extra=(PlanArgs,), description=__doc__)
        if plan.measure:
            from cached_mslt.bench import measure_rates

            measured = measure_rates(
                args.model.preset, args.train.batch_size, args.train.reuse_host_memory
            )
            print("measured:", json.dumps(measured), file=sys.stderr)
            plan = dataclasses.replace(
                plan,
                train_tflops=measured["train_tflops"],
                forward_tflops=measured["forward_tflops"],
                read_gbps=measured["read_gbps"] * plan.gpus,
                write_gbps=measured["write_gbps"] * plan.gpus,
            )
        report = make_plan(args, plan)
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
    if plan.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print(format_plan(report["stages"], report["totals"]))


if __name__ == "__main__":
    main()
