"""Fine-tune a pretrained checkpoint on downstream tasks and print accuracy over seeds.

    python pipelines/finetune.py --checkpoint runs/tiny/stage-4/model --task sentiment bbc --seeds 0 1 2
    python pipelines/finetune.py --checkpoint runs/tiny/stage-4/model --task bbc --evaluation probe
    python pipelines/finetune.py --checkpoint runs/tiny/stage-4/model --task bbc --freeze_layers 8

Tasks are 'sentiment', 'bbc' or .csv/.jsonl files with text,label columns (docs/evaluation.md).
Multi-process: `accelerate launch pipelines/finetune.py ...`.
"""

from __future__ import annotations

import logging

from accelerate import PartialState

from cached_mslt.config import ConfigError, parse_args
from cached_mslt.data import BUNDLED, TRAINED, load_tokenizer
from cached_mslt.evaluation import (
    FinetuneArgs,
    StoreLocation,
    evaluate_checkpoint,
    format_probes,
    format_results,
)
from cached_mslt.training import leave_process_group


def main(argv: list[str] | None = None) -> list[dict]:
    run, (args,) = parse_args(argv, extra=(FinetuneArgs,), description=__doc__)
    if args.checkpoint is None:
        raise ConfigError("--checkpoint is required: a checkpoint dir written by save_pretrained")
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO
    )
    # Default: the checkpoint's own tokenizer if it saved one, else the bundled one; a
    # tokenizer directory given with --tokenizer overrides both.
    own = run.data.tokenizer in (BUNDLED, TRAINED)
    tokenizer = None if own else load_tokenizer(run.data.tokenizer)
    # --freeze_layers: the task stores live under --cache_url (default: beside the results)
    location = StoreLocation(
        run.schedule.cache_url, run.schedule.storage_options(), run.schedule.overwrite_cache
    )
    results = evaluate_checkpoint(args.checkpoint, args, tokenizer=tokenizer, location=location)
    if PartialState().is_main_process:
        if results["finetune"]:
            print(format_results(results["finetune"]))
        if results["probe"]:
            print(format_probes(results["probe"]))
    leave_process_group()
    return results["finetune"] + results["probe"]


if __name__ == "__main__":
    main()
