"""Run every stage of the plan, writing the summary table and the loss plot after each.

`python pipelines/pretrain.py --preset tiny` or `accelerate launch pipelines/pretrain.py ...`
(on several machines: one `accelerate launch` per machine, docs/scaling.md).
Finished stages are skipped and an interrupted one resumes, so re-running continues a run.

`python pipelines/pretrain.py --preset tiny --run_dir runs/x --write_config` only writes
runs/x/config.json (the file every node and every `pipelines/stage.py` call names with
`--config`) and exits.
"""

import sys
from dataclasses import dataclass, field

from cached_mslt.config import parse_args
from cached_mslt.stages import USER_ERRORS, run_all, write_run_config


@dataclass
class PretrainArgs:
    write_config: bool = field(
        default=False,
        metadata={"help": "only write <run_dir>/config.json from these options, then exit"},
    )


def main() -> None:
    try:
        args, (pretrain,) = parse_args(extra=(PretrainArgs,), description=__doc__)
        if pretrain.write_config:
            path, written = write_run_config(args)
            print(f"{'wrote' if written else 'kept the same run config'} {path}; next:")
            print(f"  accelerate launch pipelines/pretrain.py --config {path}")
            return
        run_all(args)
    except USER_ERRORS as e:  # a message that says what to run, not a traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
