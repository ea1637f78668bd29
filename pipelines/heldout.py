"""A checkpoint's masked-LM loss on held-out prose, beside the unigram loss of its vocabulary.

    python pipelines/heldout.py --checkpoint runs/tiny/stage-4/model
    python pipelines/heldout.py --checkpoint runs/tiny/stage-4/model --texts data/heldout/moby-dick
    python pipelines/heldout.py --checkpoint runs/x/stage-4/model --prepared_dir data/prepared/x \\
        --texts my/held/out/folder --json

Defaults: the State of the Union addresses of 2001-2021 in data/heldout (public domain, in
none of the project's data: data/heldout/README.md), 15% masking with a fixed seed, and
the run's prepared data for the unigram reference (docs/levers.md, held-out prose).
`data/heldout/moby-dick` is a second held-out text, of a genre none of the corpora has
(the `tiny` preset trains on the 1790-2000 addresses, the first text's genre).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cached_mslt.data import DataError
from cached_mslt.inspect import HeldoutError, heldout_check, heldout_texts

DEFAULT_TEXTS = "data/heldout/sotu-2001-2021"


def prepared_dir_of(checkpoint: Path) -> str:
    """The run's prepared data, from the config.json beside its stage directories."""
    config = checkpoint.parent.parent / "config.json"
    if not config.is_file():
        raise HeldoutError(f"{config} not found; pass --prepared_dir (the run's prepared data)")
    return json.loads(config.read_text())["data"]["prepared_dir"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a saved model dir (stage-K/model)")
    parser.add_argument("--prepared_dir", help="default: the run's (its config.json)")
    parser.add_argument("--texts", nargs="+", default=[DEFAULT_TEXTS])
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--mask_prob", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    try:
        checkpoint = Path(args.checkpoint)
        prepared = args.prepared_dir or prepared_dir_of(checkpoint)
        result = heldout_check(
            checkpoint,
            prepared,
            heldout_texts(args.texts),
            seq_len=args.seq_len,
            mask_prob=args.mask_prob,
            seed=args.seed,
        )
    except (HeldoutError, DataError, OSError) as e:
        sys.exit(f"error: {e}")
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print(
        f"held-out: {result.documents} documents, {result.sequences:,} sequences of "
        f"{args.seq_len}, {result.masked:,} masked tokens\n"
        f"loss {result.loss:.3f}; unigram loss of the vocabulary {result.unigram_loss:.3f}; "
        f"{result.below_unigram:.1f}% below unigram"
    )


if __name__ == "__main__":
    main()
