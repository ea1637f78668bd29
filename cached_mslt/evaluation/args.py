"""The evaluation options (`--task`, `--seeds`, `--evaluation`...): one dataclass beside the run's groups."""

from __future__ import annotations

from dataclasses import dataclass, field

from cached_mslt.config import ConfigError
from cached_mslt.evaluation.tasks import DEFAULT_TASK_DIR


class FinetuneError(ValueError):
    """A checkpoint cannot be fine-tuned as asked; the message says why and what to pass."""


@dataclass
class FinetuneArgs:
    # Names that TrainArgs/DataArgs already use (seed, learning_rate, ...) carry a `finetune_`
    # or `task_` prefix: all groups share one flag namespace.
    checkpoint: str | None = field(
        default=None, metadata={"help": "BertForMaskedLM (or any local BERT) checkpoint dir"}
    )
    task: list[str] = field(
        default_factory=lambda: ["sentiment", "bbc"],
        metadata={"help": "'sentiment', 'bbc', or .csv/.jsonl files with text,label columns"},
    )
    label_names: list[str] | None = field(
        default=None, metadata={"help": "labels of a task file, in id order; others are refused"}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    output_dir: str | None = field(default=None, metadata={"help": "default <checkpoint>/finetune"})
    task_dir: str = field(default=DEFAULT_TASK_DIR, metadata={"help": "prepared tasks live here"})
    task_split_seed: int = field(default=0, metadata={"help": "seed of the train/valid/test split"})
    task_valid_fraction: float = 0.1
    task_test_fraction: float = 0.1
    max_seq_len: int = 128
    max_train_examples: int | None = field(
        default=None, metadata={"help": "fine-tune on a fixed random subset of the train split"}
    )
    finetune_batch_size: int = 32
    finetune_lr: float = 1e-4
    finetune_epochs: int = 3
    finetune_warmup_ratio: float = 0.1
    finetune_weight_decay: float = 0.01
    early_stopping_patience: int = field(
        # Not 1: a small encoder can spend a whole epoch on a plateau and still learn after
        # it (docs/evaluation.md).
        default=2,
        metadata={"help": "stop after this many epochs without a better validation"},
    )
    finetune_log_every: int = 20
    evaluation: list[str] = field(
        default_factory=lambda: ["finetune"],
        metadata={
            "help": "finetune and/or probe: a linear probe on the frozen encoder's mean-pooled "
            "features (deterministic, no seeds; writes probe_results.json beside the "
            "fine-tuning results)"
        },
    )
    overlap_corpus: list[str] | None = field(
        default=None,
        metadata={
            "help": "pretraining corpus specs (as --corpus) to check task texts against; "
            "default: the corpus in the config.json of the run that wrote the checkpoint; 'none'"
        },
    )

    def __post_init__(self) -> None:
        unknown = sorted(set(self.evaluation) - {"finetune", "probe"})
        if unknown or not self.evaluation:
            raise ConfigError(f"--evaluation takes finetune and/or probe, got {self.evaluation}")
        if not self.seeds:
            raise ConfigError("--seeds needs at least one seed")
        for name in ("finetune_epochs", "finetune_batch_size", "early_stopping_patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
