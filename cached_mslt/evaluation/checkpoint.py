"""Loading a pretrained checkpoint for evaluation: its encoder under a new classification
head, and the tokenizer that made its ids."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from accelerate.logging import get_logger
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

import cached_mslt.models  # noqa: F401  (registers the pre-LN model with the Auto classes)
from cached_mslt.data import check_vocab, load_tokenizer
from cached_mslt.evaluation.args import FinetuneError

logger = get_logger(__name__)


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


def load_classifier(
    checkpoint_dir: str | Path,
    num_labels: int,
    model_class: type[PreTrainedModel] | None = None,
) -> PreTrainedModel:
    """The checkpoint's encoder under a new classification head (`model_class`, default:
    the one the Auto classes register for the checkpoint's architecture).

    An MLM checkpoint has no pooler and no classifier, so those start random, and its MLM head
    is left out: that is what fine-tuning is, yet transformers prints it as a warning table.
    We silence the table and check the lists ourselves: anything else missing means the
    checkpoint is not the encoder it claims to be.
    """
    # A filter, not a higher level: at WARNING or above transformers also runs (and logs)
    # its tensor-parallel plan check.
    hf_logger = hf_logging.get_logger("transformers.modeling_utils")
    hf_logger.addFilter(_drop_load_report)
    model_class = model_class or AutoModelForSequenceClassification
    try:
        model, info = model_class.from_pretrained(
            str(checkpoint_dir),
            num_labels=num_labels,
            output_loading_info=True,
            local_files_only=True,
        )
    except (OSError, ValueError) as e:
        raise FinetuneError(f"cannot load a model from {checkpoint_dir}: {e}") from e
    finally:
        hf_logger.removeFilter(_drop_load_report)
    new_head = ("classifier.", f"{model.base_model_prefix}.pooler.")
    missing = sorted(info["missing_keys"])
    not_head = [k for k in missing if not k.startswith(new_head)]
    if not_head:
        raise FinetuneError(
            f"{checkpoint_dir} lacks encoder weights {not_head[:4]} ({len(not_head)} in all); "
            "pass a BERT checkpoint written with save_pretrained"
        )
    logger.info(
        f"loaded the encoder from {checkpoint_dir}; new, randomly initialised as expected: "
        f"{sorted({k.rsplit('.', 1)[0] for k in missing})}; left out: "
        f"{len(info['unexpected_keys'])} tensors of the pretraining head"
    )
    return model


def checkpoint_tokenizer(
    checkpoint_dir: Path, tokenizer: PreTrainedTokenizerBase | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer to evaluate a checkpoint with: `tokenizer`, else the checkpoint's own
    (stage checkpoints are saved with theirs), else the bundled one; checked against the
    checkpoint's vocabulary. A directory that is not a checkpoint is refused here, first."""
    if not (checkpoint_dir / "config.json").is_file():
        raise FinetuneError(
            f"{checkpoint_dir} is not a checkpoint (no config.json); "
            "pass a directory written by save_pretrained"
        )
    if tokenizer is None:
        has_own = any((checkpoint_dir / f).is_file() for f in ("tokenizer.json", "vocab.txt"))
        tokenizer = load_tokenizer(str(checkpoint_dir) if has_own else "bundled")
    vocab_size = json.loads((checkpoint_dir / "config.json").read_text())["vocab_size"]
    check_vocab(tokenizer, vocab_size, source=f"checkpoint {checkpoint_dir}")
    return tokenizer
