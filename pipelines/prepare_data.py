"""Prepare the MLM pretraining data: corpus -> packed, statically masked examples on disk.

python pipelines/prepare_data.py --preset tiny                      # bundled corpus
python pipelines/prepare_data.py --corpus notes.txt docs/ --views 4 --overwrite
"""

import logging
import time

from cached_mslt.config import ConfigError, parse_args
from cached_mslt.data import (
    DataError,
    PrepareArgs,
    TokenizerError,
    prepare_dataset,
    prepared_manifest,
    summary,
)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        args, (prepare_args,) = parse_args(extra=(PrepareArgs,), description=__doc__)
        path = prepare_dataset(args, overwrite=prepare_args.overwrite)
        manifest = prepared_manifest(path)  # the manifest only: the splits may not fit in memory
    except (ConfigError, DataError, TokenizerError) as e:
        raise SystemExit(f"error: {e}") from None  # a message for the user, not a traceback
    print(summary(path, manifest))
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
