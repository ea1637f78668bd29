"""The commands errors print as their fix (docs/reliability.md: every one is tested by
running it): a lower learning rate after a divergence, rebuilding a store, the
credentials an object store needs."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cached_mslt.config import RunArgs
from cached_mslt.rundir import RunLayout
from storage import (
    ActivationStore,
    CorruptStoreError,
    IncompleteStoreError,
    StaleStoreError,
    StoreExistsError,
    is_remote,
    public_options,
)

logger = logging.getLogger(__name__)


# Pretraining rates that diverge are rarely off by less than 10x; a rate above the usual
# BERT range goes straight back into it (a 1e5 rate lowered 10x diverged again, and again).
SAFE_LEARNING_RATE = 1e-3


# Below this a diverging loss is not the learning rate's doing: lowering it again is no fix.
LOWEST_LEARNING_RATE = 1e-6


def lower_learning_rate(rate: float) -> float | None:
    """The rate to retry a diverged stage with, or None when lowering is no longer a fix."""
    if not math.isfinite(rate) or rate <= 0:
        return SAFE_LEARNING_RATE / 10
    if rate <= LOWEST_LEARNING_RATE:
        return None
    return max(min(rate / 10, SAFE_LEARNING_RATE), LOWEST_LEARNING_RATE)


def divergence_fix(args: RunArgs, index: int, checkpoint_dir: Path) -> str:
    """The command that retrains diverged stage `index` at a lower rate, or why to stop
    trying (the saved optimizer state carries the old rate, so the checkpoint goes first)."""
    rate = args.train.learning_rate
    lower = lower_learning_rate(rate)
    if lower is None:
        return (
            f"stop: the loss is not finite even at --learning_rate {rate:g}, so a lower rate "
            f"will not help; expected finite losses from the data and the model, so check the "
            f"prepared data ({args.data.prepared_dir}) and --mixed_precision"
        )
    return (
        f"fix: rm -rf {checkpoint_dir} && accelerate launch pipelines/stage.py "
        f"--config {RunLayout.of(args).config} --stage {index} --learning_rate {lower:g}"
    )


def repair_credentials_note(args: RunArgs) -> str:
    """What a store repair on an object store needs besides the printed command: the
    credentials, which are never saved (docs/reliability.md, secrets)."""
    given = args.schedule.storage_options()
    if not args.schedule.cache_url or not is_remote(args.schedule.cache_url):
        return ""
    if given == public_options(given):
        return " (credentials from the AWS_* environment, as for the first command)"
    return (
        " --cache_storage_options '<the JSON you first passed, with its credentials>' "
        "(config.json never holds them; or export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    )


def repair_command(args: RunArgs, index: int) -> str:
    return (
        f"accelerate launch pipelines/stage.py --config "
        f"{RunLayout.of(args).config} --stage {index} --rebuild_cache"
        + repair_credentials_note(args)
    )


@contextmanager
def store_repair_hint(args: RunArgs, index: int, source: ActivationStore | None) -> Iterator[None]:
    """A store that cannot be used (stale, corrupt, half-written by another build) is
    repaired by one command: rebuilding the store it is, this stage's or the source's."""
    try:
        yield
    except (StaleStoreError, CorruptStoreError, IncompleteStoreError, StoreExistsError) as e:
        owner = index
        if source is not None and str(source.url) in str(e):
            owner = index - 1  # the previous stage's store, read by an incremental build
        # Same type (callers act on it), with the command added.
        raise type(e)(f"{e}\nfix: {repair_command(args, owner)}") from e
