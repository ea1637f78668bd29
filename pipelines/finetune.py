"""Fine-tune a pretrained checkpoint on downstream tasks and print accuracy over seeds.

    python pipelines/finetune.py --checkpoint runs/tiny/stage-4/model --task sentiment bbc --seeds 0 1 2
    python pipelines/finetune.py --checkpoint runs/tiny/stage-4/model --task bbc --evaluation probe

Tasks are 'sentiment', 'bbc' or .csv/.jsonl files with text,label columns (docs/evaluation.md).
Multi-process: `accelerate launch pipelines/finetune.py ...`.
"""

from __future__ import annotations

import logging

from accelerate import PartialState

from cached_mslt.config import ConfigError, parse_args
from cached_mslt.finetune import FinetuneArgs, finetune, format_results
from cached_mslt.linear_probe import format_probes, linear_probe
from cached_mslt.tokenizer import BUNDLED, TRAINED, load_tokenizer


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
    results = []
    if "finetune" in args.evaluation:
        results = [finetune(args.checkpoint, t, args, tokenizer=tokenizer) for t in args.task]
        if PartialState().is_main_process:
            print(format_results(results))
    if "probe" in args.evaluation and PartialState().is_main_process:  # one forward pass
        probes = [linear_probe(args.checkpoint, t, args, tokenizer=tokenizer) for t in args.task]
        print(format_probes(probes))
        results += probes
    return results


if __name__ == "__main__":
    main()
