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
    finetune_lr: list[float] = field(
        default_factory=lambda: [1e-4],
        metadata={"help": "one or more learning rates: every seed runs at each (a sweep)"},
    )
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
    freeze_layers: int = field(
        default=0,
        metadata={
            "help": "freeze the embeddings and the bottom K encoder layers (eval mode); their "
            "outputs over the task are built once into a store that every seed and learning "
            "rate trains the top from (docs/evaluation.md, fine-tuning from the cache)"
        },
    )
    freeze: str = field(
        default="static",
        metadata={
            "help": "static (K stays frozen) or progressive (start from --freeze_layers and "
            "freeze the next block when AutoFreeze's gradient-norm test says it converged)"
        },
    )
    freeze_interval: int = field(
        default=0, metadata={"help": "progressive: optimizer steps per freezing test; 0 = an epoch"}
    )
    freeze_percentile: float = field(
        default=50.0,
        metadata={
            "help": "progressive: a layer whose gradient-norm change rate is at or below this "
            "percentile of the trainable layers' rates has converged (AutoFreeze: the median)"
        },
    )
    freeze_keep: int = field(
        default=1, metadata={"help": "progressive: encoder layers that always keep training"}
    )
    freeze_cache: bool = field(
        default=True,
        metadata={
            "help": "read the frozen bottom's outputs from the store (False: run the frozen "
            "bottom live every step, the reference the store must equal)"
        },
    )
    freeze_cache_dtype: str = field(
        default="float32",
        metadata={"help": "store dtype: float32 (bitwise equal to live) or float16/bfloat16"},
    )
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
        if isinstance(self.finetune_lr, int | float):  # from code: one rate
            self.finetune_lr = [float(self.finetune_lr)]
        if not self.finetune_lr or min(self.finetune_lr) <= 0:
            raise ConfigError(f"--finetune_lr needs positive rates, got {self.finetune_lr}")
        self._check_freezing()
        if not self.seeds:
            raise ConfigError("--seeds needs at least one seed")
        for name in ("finetune_epochs", "finetune_batch_size", "early_stopping_patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")

    def _check_freezing(self) -> None:
        if self.freeze not in ("static", "progressive"):
            raise ConfigError(f"--freeze takes static or progressive, got {self.freeze!r}")
        if self.freeze_layers < 0 or self.freeze_keep < 1:
            raise ConfigError(
                f"--freeze_layers must be >= 0 and --freeze_keep >= 1, got "
                f"{self.freeze_layers} and {self.freeze_keep}"
            )
        if self.freeze == "progressive" and not self.freeze_cache:
            raise ConfigError("--freeze progressive extends the store: it needs --freeze_cache")
        if not 0 <= self.freeze_percentile <= 100 or self.freeze_interval < 0:
            raise ConfigError(
                "--freeze_percentile must be in [0, 100] and --freeze_interval >= 0, got "
                f"{self.freeze_percentile} and {self.freeze_interval}"
            )
        if self.freeze_cache_dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(
                f"--freeze_cache_dtype is float32, float16 or bfloat16, got {self.freeze_cache_dtype!r}"
            )

    @property
    def freezes(self) -> bool:
        """Whether the bottom is frozen: a static K > 0, or progressive freezing."""
        return self.freeze_layers > 0 or self.freeze == "progressive"
