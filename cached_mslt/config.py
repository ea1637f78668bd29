"""The one config home: dataclasses parsed by `transformers.HfArgumentParser`.

Every entry point takes the same groups, from flags or from a YAML/JSON file
(`--config run.yaml`; flags given next to it override the file). Presets fill in
model sizes and schedule defaults; any field set explicitly wins over the preset.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from storage import CODECS as STORE_CODECS
from storage import DTYPES as STORE_DTYPES

GROWTH_INITS = ("copy", "fresh", "identity")

# What a preset means: the default of every option it sets and the user left unset.
# All three are 12-layer BERTs; `tiny` is the CPU default, and its values are the regime
# measured in docs/levers.md (where pretraining gets well past word frequencies on 2 cores).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=128,
        num_attention_heads=2,
        intermediate_size=512,
        seq_len=128,
        corpus=("default", "sotu"),
        tokenizer="train",
        vocab_size=8192,
        train_examples=0,
        dropout=0.0,
        mask_prob=0.4,
        batch_size=8,
        stage_tokens="7000000,2000000,2000000,2000000",
        views=8,
        lr_scope="run",
        growth_init="identity",
        stage_order="fresh",
    ),
    "mini": dict(
        hidden_size=256,
        num_attention_heads=4,
        intermediate_size=1024,
        seq_len=128,
        corpus=("default",),
        tokenizer="train",
        vocab_size=16384,
        train_examples=0,
        dropout=0.1,
        mask_prob=0.15,
        batch_size=32,
        stage_tokens="1048576",
        views=1,
        lr_scope="stage",
        growth_init="copy",
        stage_order="same",
    ),
    "bert-base": dict(
        hidden_size=768,
        num_attention_heads=12,
        intermediate_size=3072,
        seq_len=128,
        corpus=("default",),
        tokenizer="bundled",
        vocab_size=30522,
        train_examples=0,
        dropout=0.1,
        mask_prob=0.15,
        batch_size=32,
        stage_tokens="1048576",
        views=1,
        lr_scope="stage",
        growth_init="copy",
        stage_order="same",
    ),
}


class ConfigError(ValueError):
    """A configuration value is invalid or inconsistent; the message says which and how to fix."""


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# What every numeric option means, checked once the presets are resolved: a count is a whole
# number, a budget is positive, a share is a fraction. (test, what was expected, an example)
RANGES: dict[str, tuple[Any, str, str]] = {
    "num_layers": (lambda v: _whole(v) and v >= 1, "a whole number >= 1", "12"),
    "hidden_size": (lambda v: _whole(v) and v >= 1, "a whole number >= 1", "128"),
    "num_attention_heads": (lambda v: _whole(v) and v >= 1, "a whole number >= 1", "2"),
    "intermediate_size": (lambda v: _whole(v) and v >= 1, "a whole number >= 1", "512"),
    "max_position_embeddings": (lambda v: _whole(v) and v >= 8, "a whole number >= 8", "512"),
    "dropout": (lambda v: _finite(v) and 0 <= v < 1, "a fraction in [0, 1)", "0.1"),
    "views": (lambda v: _whole(v) and v >= 1, "a whole number >= 1", "1"),
    "valid_fraction": (lambda v: _finite(v) and 0 < v < 1, "a fraction in (0, 1)", "0.02"),
    "num_proc": (lambda v: _whole(v) and v >= 1, "a whole number >= 1", "2"),
    "max_documents": (lambda v: v is None or _whole(v) and v >= 1, "None or >= 1", "1000"),
    "train_examples": (lambda v: _whole(v) and v >= 0, "a whole number >= 0 (0: all)", "0"),
    "vocab_size": (lambda v: v is None or _whole(v) and v >= 8, "a whole number >= 8", "8192"),
    "vocab_min_frequency": (lambda v: _whole(v) and v >= 1, "a whole number >= 1", "2"),
    "batch_size": (lambda v: _whole(v) and v >= 1, "a whole number of sequences >= 1", "8"),
    "gradient_accumulation_steps": (lambda v: _whole(v) and v >= 1, "a whole number >= 1", "1"),
    "learning_rate": (lambda v: _finite(v) and v > 0, "a finite number > 0", "1e-3"),
    "weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0", "0.01"),
    "adam_beta1": (lambda v: _finite(v) and 0 <= v < 1, "a fraction in [0, 1)", "0.9"),
    "adam_beta2": (lambda v: _finite(v) and 0 <= v < 1, "a fraction in [0, 1)", "0.98"),
    "adam_epsilon": (lambda v: _finite(v) and v > 0, "a finite number > 0", "1e-6"),
    "max_grad_norm": (lambda v: _finite(v) and v >= 0, "a finite number >= 0 (0: off)", "1.0"),
    "nonfinite_patience": (lambda v: _whole(v) and v >= 1, "a whole number of steps >= 1", "3"),
    "eval_every": (lambda v: _whole(v) and v >= 1, "a whole number of steps >= 1", "100"),
    "eval_batches": (lambda v: v is None or _whole(v) and v >= 1, "None or >= 1", "20"),
    "log_every": (lambda v: _whole(v) and v >= 1, "a whole number of steps >= 1", "10"),
    "sync_every": (lambda v: v is None or _whole(v) and v >= 1, "None or steps >= 1", "10"),
    "checkpoint_every": (lambda v: _whole(v) and v >= 1, "a whole number of steps >= 1", "200"),
    "num_workers": (lambda v: _whole(v) and v >= 0, "a whole number >= 0", "0"),
    "max_wall_s": (lambda v: v is None or _finite(v) and v > 0, "seconds > 0", "3600"),
    "cache_connect_timeout_s": (lambda v: _finite(v) and v > 0, "seconds > 0", "5"),
    "cache_read_timeout_s": (lambda v: _finite(v) and v > 0, "seconds > 0", "20"),
    "peak_tflops": (lambda v: v is None or _finite(v) and v > 0, "TFLOP/s > 0", "312"),
    "warmup_fraction": (lambda v: _finite(v) and 0 <= v < 1, "a fraction in [0, 1)", "0.06"),
    "decay_fraction": (lambda v: _finite(v) and 0 < v <= 1, "a fraction in (0, 1]", "0.2"),
    "joint_tokens": (lambda v: _finite(v) and v >= 0, "a token count >= 0", "0"),
    "budget_tokens": (lambda v: v is None or _finite(v) and v >= 1, "tokens >= 1", "2097152"),
    "budget_wall_s": (lambda v: v is None or _finite(v) and v > 0, "seconds > 0", "600"),
    "budget_cpu_s": (lambda v: v is None or _finite(v) and v > 0, "seconds > 0", "600"),
    "budget_flops": (lambda v: v is None or _finite(v) and v > 0, "FLOPs > 0", "1e15"),
    "learning_rates": (
        lambda v: all(_finite(x) and x > 0 for x in v),
        "finite rates > 0",
        "1e-3 3e-3",
    ),
    "mslt_joint_fraction": (lambda v: _finite(v) and 0 < v < 1, "a fraction in (0, 1)", "0.1"),
    "sweep_budget_fraction": (lambda v: _finite(v) and 0 < v <= 1, "a fraction in (0, 1]", "0.25"),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "attn_implementation": ("sdpa", "eager"),
    "mixed_precision": (None, "no", "fp16", "bf16"),  # None: the launcher's
    "mslt_cache": ("write-through", "always"),
}


def _check_each(text: str | None, name: str, ok, expected: str, example: str) -> None:
    """A per-stage option: comma-separated values, each of which `ok` accepts."""
    if text is None:
        return
    for part in str(text).replace(" ", "").split(","):
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and ok(value)):
            raise ConfigError(
                f"--{name} {text!r}: {part!r} is not {expected}; give one value for every "
                f"stage or one per stage, e.g. --{name} {example}"
            )


def _check_counts(text: str | None, name: str, what: str) -> None:
    """`--stage_steps`/`--stage_tokens`: comma-separated whole numbers > 0 (a stage of 0.5
    steps is not a stage: int() would make it 0 and mark it done untrained)."""
    example = "6" if what == "steps" else "2097152"
    _check_each(
        text, name, lambda v: v >= 1 and v == int(v), f"a whole number of {what} >= 1", example
    )


def validate(groups: tuple[Any, ...]) -> None:
    """Refuse out-of-range values at parse time, before anything is read or written."""
    for group in groups:
        for f in dataclasses.fields(group):
            value = getattr(group, f.name)
            if f.name in RANGES and not RANGES[f.name][0](value):
                _, expected, example = RANGES[f.name]
                raise ConfigError(
                    f"--{f.name} {value!r}: expected {expected}; e.g. --{f.name} {example}"
                )
            if f.name in CHOICES and value not in CHOICES[f.name]:
                raise ConfigError(f"--{f.name} {value!r}: choose one of {CHOICES[f.name]}")


@dataclass
class ModelArgs:
    preset: str = field(default="tiny", metadata={"help": f"one of {sorted(PRESETS)}"})
    num_layers: int = field(default=12, metadata={"help": "encoder depth of the final model"})
    hidden_size: int | None = field(default=None, metadata={"help": "default: preset"})
    num_attention_heads: int | None = field(default=None, metadata={"help": "default: preset"})
    intermediate_size: int | None = field(default=None, metadata={"help": "default: preset"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa or eager"})
    dropout: float | None = field(
        default=None,
        metadata={"help": "hidden and attention dropout (BERT: 0.1; tiny: 0, see docs/levers.md)"},
    )
    max_position_embeddings: int = 512

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        for name in ("hidden_size", "num_attention_heads", "intermediate_size", "dropout"):
            if getattr(self, name) is None:
                setattr(self, name, PRESETS[self.preset][name])
        if self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )


@dataclass
class DataArgs:
    corpus: list[str] | None = field(
        default=None,
        metadata={
            "help": "'default' (bundled Wikipedia summaries + Brown corpus), the bundled "
            "'wikipedia', 'brown' or 'sotu' (docs/data.md), or paths to .txt/.jsonl/.parquet "
            "files, folders of them, or a datasets dataset saved to disk; default: preset"
        },
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "'train' (fit a WordPiece vocabulary of --vocab_size to the training split), "
            "'bundled' (bert-base-uncased WordPiece, offline) or a local tokenizer dir; "
            "default: preset"
        },
    )
    prepared_dir: str | None = field(
        default=None,
        metadata={"help": "where the prepared dataset lives; default data/prepared/<preset>"},
    )
    seq_len: int | None = field(
        default=None, metadata={"help": "tokens per packed sequence; default: preset"}
    )
    mask_prob: float | None = field(
        default=None,
        metadata={
            "help": "share of a training sequence's tokens to predict (BERT: 0.15); default: preset"
        },
    )
    valid_mask_prob: float = field(
        default=0.15,
        metadata={
            "help": "masking rate of the validation split: fixed (BERT's 0.15) so validation "
            "losses compare across training masking rates"
        },
    )
    mask_seed: int = field(
        default=1234, metadata={"help": "static masking seed: mask(i) = f(seed, i)"}
    )
    views: int | None = field(
        default=None,
        metadata={
            "help": "masked views of each training sequence, each its own static mask (BERT's "
            "duplication factor; validation keeps one); a view is another row of the cache; "
            "default: preset"
        },
    )
    valid_fraction: float = 0.02
    split_seed: int = 0
    num_proc: int = 2
    strict: bool = field(
        default=False, metadata={"help": "fail on undecodable bytes instead of skipping"}
    )
    max_documents: int | None = field(
        default=None, metadata={"help": "use only the first N documents"}
    )
    train_examples: int | None = field(
        default=None,
        metadata={
            "help": "train on the first N prepared examples (the cache holds exactly these); "
            "0 = all; default: preset"
        },
    )
    text_column: str = "text"
    vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "with --tokenizer train: the vocabulary size to fit (default: preset); "
            "otherwise, if given, the size the tokenizer must have"
        },
    )
    vocab_min_frequency: int = field(
        default=2, metadata={"help": "--tokenizer train: a word piece must occur this often"}
    )

    def resolve(self, model: ModelArgs) -> None:
        preset = PRESETS[model.preset]
        if self.corpus is None:
            self.corpus = list(preset["corpus"])
        for name in ("seq_len", "tokenizer", "train_examples", "mask_prob", "views"):
            if getattr(self, name) is None:
                setattr(self, name, preset[name])
        # The preset's vocabulary size is the size to fit; a given tokenizer has its own.
        if self.vocab_size is None and self.tokenizer == "train":
            self.vocab_size = preset["vocab_size"]
        if self.prepared_dir is None:
            self.prepared_dir = f"data/prepared/{model.preset}"
        for name in ("mask_prob", "valid_mask_prob"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.seq_len < 8 or self.seq_len > model.max_position_embeddings:
            raise ConfigError(
                f"seq_len {self.seq_len} must be in [8, max_position_embeddings="
                f"{model.max_position_embeddings}]"
            )


@dataclass
class TrainArgs:
    run_dir: str | None = field(default=None, metadata={"help": "default runs/<preset>"})
    seed: int = 0
    batch_size: int | None = field(
        default=None, metadata={"help": "per-process micro-batch (sequences); default: preset"}
    )
    block_rows: int | None = field(
        default=None,
        metadata={
            "help": "rows per store chunk and loader block, a divisor of --batch_size "
            "(default: the largest up to 8). A batch is batch_size / block_rows blocks from "
            "as many random places; larger blocks are fewer, larger store reads (what an "
            "object store serves fastest: docs/benchmarks.md) and a coarser shuffle"
        },
    )
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    max_grad_norm: float = 1.0
    nonfinite_patience: int = field(
        default=3,
        metadata={
            "help": "stop a stage (not done) after this many consecutive optimizer steps with a "
            "non-finite loss or gradient norm; such steps are skipped, not applied"
        },
    )
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "no, fp16 or bf16; default: the launcher's (accelerate launch "
            "--mixed_precision, its config file or ACCELERATE_MIXED_PRECISION), else no. "
            "Given both ways with different values, the run refuses to start"
        },
    )
    eval_every: int = field(default=100, metadata={"help": "validation every N optimizer steps"})
    eval_batches: int | None = field(default=None, metadata={"help": "cap validation batches"})
    log_every: int = 10
    sync_every: int | None = field(
        default=None,
        metadata={
            "help": "every N optimizer steps the device's loss and non-finite counters are read "
            "and, with several processes, the ranks reconcile token counts and clocks and agree "
            "to stop (a budget then ends within N steps); default: --log_every. One process "
            "checks its budgets every step on host values (docs/design.md, the hot path)"
        },
    )
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile the trainable top (docs/levers.md, compile)"},
    )
    reuse_host_memory: bool = field(
        default=True,
        metadata={
            "help": "keep freed host memory for the next step instead of returning it to the "
            "OS (glibc: no mmap, no trim): steps stop re-faulting their large tensors, the "
            "process keeps its peak heap; --no_reuse_host_memory for glibc's default "
            "(docs/levers.md, host memory)"
        },
    )
    checkpoint_every: int = field(
        default=200, metadata={"help": "save_state every N steps (resume)"}
    )
    num_workers: int = 0
    max_wall_s: float | None = field(
        default=None,
        metadata={
            "help": "wall-clock budget of the whole run (cache builds included); stops there"
        },
    )
    report_to: str | None = field(
        default=None, metadata={"help": "Accelerate tracker, e.g. tensorboard"}
    )
    override_run_config: bool = field(
        default=False,
        metadata={
            "help": "accept options that shape the plan, the model or the data although they "
            "differ from the run's contract (<run_dir>/run_identity.json); the contract and "
            "config.json then take the new values (docs/reliability.md, the run's contract)"
        },
    )
    peak_tflops: float | None = field(
        default=None,
        metadata={
            "help": "MFU reference: dense peak TFLOP/s of one device; default: the GPU table "
            "of cached_mslt/training/flops.py, or on a CPU an fp32 matmul measured at the run's start"
        },
    )


@dataclass
class ScheduleArgs:
    """The MSLT stage plan in flag form; `StagePlan.from_args` turns it into stages."""

    stage_layers: str = field(
        default="3,6,9,12", metadata={"help": "total encoder layers at the end of each stage"}
    )
    stage_tokens: str | None = field(
        default=None,
        metadata={
            "help": "training tokens per stage: one value for all, or one per stage; default: "
            "preset"
        },
    )
    stage_steps: str | None = field(
        default=None, metadata={"help": "optimizer steps per stage (overrides stage_tokens)"}
    )
    stage_dropout: str | None = field(
        default=None,
        metadata={
            "help": "hidden and attention dropout per stage, one value for all or one per "
            "stage, e.g. 0,0.1,0.1,0.1 (what the trainable layers and head drop; the frozen "
            "bottom runs in eval mode and never drops); default: --dropout in every stage "
            "(docs/levers.md, lever 3)"
        },
    )
    warmup_fraction: float = field(default=0.06, metadata={"help": "linear warmup share per stage"})
    lr_schedule: str = field(
        default="linear",
        metadata={
            "help": "linear or cosine decay to zero after the warm-up, or wsd (warm-up, "
            "stable: the peak held, then a linear decay over the last --decay_fraction; "
            "docs/levers.md)"
        },
    )
    decay_fraction: float = field(
        default=0.2, metadata={"help": "wsd: the share of the curve that decays to zero"}
    )
    lr_scope: str | None = field(
        default=None,
        metadata={
            "help": "stage (each stage warms up and decays on its own) or run (one warm-up "
            "and decay over the whole plan, each stage continuing the curve where the last "
            "ended; --warmup_fraction is then of the run); default: preset "
            "(docs/levers.md, growth that pays)"
        },
    )
    stage_order: str | None = field(
        default=None,
        metadata={
            "help": "same (every stage reads the rows in one seeded order, so stage K+1 "
            "reads the rows stage K's store holds) or fresh (stage K shuffles with seed + "
            "K - 1: a grown stage reads other (sequence, mask) pairs than the stage before; "
            "with --views its rows are mostly ones no earlier stage read); default: preset "
            "(docs/levers.md, growth that pays)"
        },
    )
    growth_init: str | None = field(
        default=None,
        metadata={
            "help": "new layers: copy (of the top layers), fresh (random) or identity "
            "(copies whose residual branches start at zero: the grown model computes "
            "what the previous one did); default: preset"
        },
    )
    cache: str = field(
        default="auto",
        metadata={
            "help": "auto (the cheapest mode by the cost model), write-through (the training "
            "steps fill the store: each row's frozen layers run once, only for rows read), "
            "always (an eager build of the whole corpus before training) or never (live)"
        },
    )
    cache_dtype: str = field(default="float16", metadata={"help": f"one of {tuple(STORE_DTYPES)}"})
    cache_codec: str = field(default="none", metadata={"help": f"one of {STORE_CODECS}"})
    cache_rebuild: str = field(
        default="incremental", metadata={"help": "incremental (from the previous store) or full"}
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "rebuild a stage's store that no longer matches (stale)"}
    )
    cache_over_share: str = field(
        default="live",
        metadata={
            "help": "under a comparison's budget share: a stage whose store build would leave "
            "it less than half its share to train on runs live (`live`) or builds anyway "
            "(`build`, what runs did before issue 31; docs/methods.md)"
        },
    )
    joint_tokens: float = field(default=0.0, metadata={"help": "final phase training all layers"})
    cache_url: str | None = field(
        default=None,
        metadata={
            "help": "where the stores live: a path or any fsspec URL (s3://bucket/prefix); "
            "stage K's store is <cache_url>/stage-K; default <run_dir>/cache"
        },
    )
    cache_storage_options: str | None = field(
        default=None,
        metadata={
            "help": 'JSON for the URL\'s filesystem, e.g. {"endpoint_url": "http://host:9000"}; '
            "credentials may be given here or in the environment (AWS_*), and are never saved"
        },
    )
    cache_connect_timeout_s: float = field(
        default=5.0,
        metadata={"help": "object store: seconds to wait for a connection (s3://)"},
    )
    cache_read_timeout_s: float = field(
        default=20.0,
        metadata={
            "help": "object store: seconds to wait for an answer (s3://); a hanging endpoint "
            "fails after a few of these (docs/reliability.md, object stores)"
        },
    )

    def __post_init__(self) -> None:
        choices = {
            "lr_schedule": ("linear", "cosine", "wsd"),
            "lr_scope": (None, "stage", "run"),
            "stage_order": (None, "same", "fresh"),
            "growth_init": (None, *GROWTH_INITS),
            "cache": ("auto", "write-through", "always", "never"),
            "cache_dtype": tuple(STORE_DTYPES),
            "cache_codec": STORE_CODECS,
            "cache_rebuild": ("incremental", "full"),
            "cache_over_share": ("live", "build"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.lr_schedule == "wsd" and self.warmup_fraction + self.decay_fraction > 1:
            raise ConfigError(
                f"--lr_schedule wsd: warmup_fraction {self.warmup_fraction} + decay_fraction "
                f"{self.decay_fraction} is over 1 (the decay would start before the warm-up "
                "ends); lower one of them"
            )
        self._storage_options = self._parse_storage_options()

    def _parse_storage_options(self) -> dict[str, Any]:
        """The options in full, kept off the dataclass fields: the field keeps only what
        may be written down, so config.json, trackers and logs never see a credential."""
        from storage import public_options

        text = self.cache_storage_options
        try:
            options = json.loads(text) if text else {}
        except json.JSONDecodeError as e:
            # not echoed: the text may hold a credential
            raise ConfigError(f"cache_storage_options is not valid JSON ({e})") from None
        if not isinstance(options, dict):
            raise ConfigError(
                f"cache_storage_options must be a JSON object, got a {type(options).__name__}"
            )
        if text:
            self.cache_storage_options = json.dumps(public_options(options), sort_keys=True)
        return options

    def storage_options(self) -> dict[str, Any]:
        """The filesystem options in full, with the timeouts bounding every request."""
        from storage import with_timeouts

        return with_timeouts(
            self.cache_url,
            self._storage_options,
            connect_s=self.cache_connect_timeout_s,
            read_s=self.cache_read_timeout_s,
        )


@dataclass
class MethodArgs:
    """The comparison methods' parameters, with the published defaults (docs/methods.md)."""

    methods: list[str] = field(
        default_factory=lambda: ["full", "mslt-cached"],
        metadata={
            "help": "the methods to run: names of `cached_mslt.methods.METHODS` (docs/methods.md)"
        },
    )
    budget_tokens: float | None = field(
        default=None,
        metadata={
            "help": "training tokens per method (default 2,097,152 when no other budget is "
            "given); with several budgets, the first one used up ends the run"
        },
    )
    budget_wall_s: float | None = field(
        default=None,
        metadata={
            "help": "wall-clock seconds per method (cache builds included, evaluation "
            "excluded): every method's phases and learning-rate schedules fit in it"
        },
    )
    budget_cpu_s: float | None = field(
        default=None,
        metadata={
            "help": "CPU seconds per method (of the slowest process): the fair budget for "
            "single-threaded runs on a shared machine"
        },
    )
    budget_flops: float | None = field(
        default=None, metadata={"help": "model FLOPs per method (cached_mslt.training.flops count)"}
    )
    learning_rates: list[float] = field(
        default_factory=list,
        metadata={
            "help": "sweep: run every method at each of these learning rates and compare each "
            "at its best (the sweep is kept in result.json and the report); default: "
            "--learning_rate only"
        },
    )
    sweep_budget_fraction: float = field(
        default=1.0,
        metadata={
            "help": "below 1, the sweep's trials run at this share of the budget and only the "
            "best rate then runs at the whole budget (a short-horizon sweep)"
        },
    )
    compare_dir: str | None = field(
        default=None, metadata={"help": "default runs/compare-<preset>"}
    )
    finetune: bool = field(
        default=False,
        metadata={"help": "fine-tune every final checkpoint (pipelines/finetune.py options)"},
    )
    reuse: bool = field(
        default=False,
        metadata={
            "help": "keep a method's finished run in compare_dir (same settings) instead of "
            "training it again: methods can run as separate, parallel calls and be fine-tuned "
            "or reported later"
        },
    )
    mslt_cache: str = field(
        default="write-through",
        metadata={
            "help": "how mslt-cached and mslt-cached-joint fill their stores: write-through "
            "(the training steps fill them) or always (an eager build per stage, what they did "
            "before write-through; docs/methods.md)"
        },
    )
    mslt_first_stage_from: str | None = field(
        default=None,
        metadata={
            "help": "the MSLT methods start from this run's finished stage 1 (another MSLT "
            "method's run directory in the same comparison, e.g. runs/compare-tiny/mslt-live) "
            "instead of training their own: stage 1 runs the same code in every MSLT "
            "variant, so sharing it takes its CPU-time noise out of a comparison of the "
            "grown stages (docs/methods.md); its cost is charged as the source recorded it. "
            "The source method itself, given the same option, trains its own; a "
            "learning-rate sweep cannot share one (each rate trains its own stage 1)"
        },
    )
    mslt_joint_fraction: float = field(
        default=0.1,
        metadata={
            "help": "mslt-live-joint / mslt-cached-joint: share of the budget for the final "
            "joint phase (every layer trains, live); the stages split the rest"
        },
    )
    # progressive stacking: 3 -> 6 -> 12; shares of the budget before each doubling
    # (published: 50k and 70k of ~400k... updates; the rest at full depth)
    stacking_layers: str = "3,6,12"
    stacking_fractions: str = "0.125,0.175"
    # progressive layer dropping
    pld_theta_bar: float = 0.5
    pld_gamma: float = 0.001
    # share-then-unshare: untie at this share of the budget
    share_fraction: float = 1 / 3
    # V-cycle: share of the budget for the first large phase and for the small (coalesced) one
    vcycle_large_fraction: float = 0.05
    vcycle_small_fraction: float = 0.45
    vcycle_alpha: float = 0.5
    vcycle_small_lr_multiplier: float = 4.0

    def __post_init__(self) -> None:
        validate((self,))


@dataclass
class RunArgs:
    """Everything one run needs, grouped by concern."""

    model: ModelArgs
    data: DataArgs
    train: TrainArgs
    schedule: ScheduleArgs

    def __post_init__(self) -> None:
        self.data.resolve(self.model)
        preset = PRESETS[self.model.preset]
        for group, name in (
            (self.train, "batch_size"),
            (self.schedule, "stage_tokens"),
            (self.schedule, "lr_scope"),
            (self.schedule, "growth_init"),
            (self.schedule, "stage_order"),
        ):
            if getattr(group, name) is None:
                setattr(group, name, preset[name])
        if self.train.run_dir is None:
            self.train.run_dir = f"runs/{self.model.preset}"
        validate((self.model, self.data, self.train, self.schedule))
        rows, batch = self.train.block_rows, self.train.batch_size
        if rows is not None and not (isinstance(rows, int) and rows >= 1 and batch % rows == 0):
            raise ConfigError(
                f"--block_rows {rows!r}: expected a divisor of --batch_size {batch} (a batch "
                f"is whole blocks); e.g. --block_rows {batch}"
            )
        _check_counts(self.schedule.stage_steps, "stage_steps", "steps")
        _check_counts(self.schedule.stage_tokens, "stage_tokens", "tokens")
        _check_each(
            self.schedule.stage_dropout, "stage_dropout", lambda v: 0 <= v < 1,
            "a fraction in [0, 1)", "0,0.1,0.1,0.1",
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))


GROUPS = (ModelArgs, DataArgs, TrainArgs, ScheduleArgs)


def _parse_file(path: Path) -> Any:
    """A JSON or YAML file's contents; one line naming file, line and column if it does not
    parse (a parser traceback names neither the file nor what to fix)."""
    text = path.read_text()
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        line, column, problem = e.lineno, e.colno, e.msg
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    kind = "JSON" if path.suffix == ".json" else "YAML"
    raise ConfigError(
        f"config file {path}:{line}:{column}: not valid {kind} ({problem}); expected a mapping "
        f"of option: value, e.g. `stage_layers: 3,6` (fix the file there, or pass flags instead)"
    ) from None


def _load_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = _parse_file(p)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    # Accept both flat files and files grouped as {model: {...}, data: {...}, ...}.
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("model", "data", "train", "schedule") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def parse_args(
    argv: list[str] | None = None, extra: tuple[type, ...] = (), description: str | None = None
) -> tuple[RunArgs, tuple[Any, ...]]:
    """Parse flags (and an optional --config file) into RunArgs plus any `extra` dataclasses.

    File values become defaults and explicit flags override them, the behaviour users know
    from torchtitan-style config managers.
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((*GROUPS, *extra), description=description)
    parser.add_argument("--config", default=None, help="YAML or JSON file of options")
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a file path")
        file_values = _load_file(argv[i + 1])
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(file_values) - known)
        if unknown:
            raise ConfigError(f"unknown options in {argv[i + 1]}: {unknown}")
        parser.set_defaults(**file_values)
    groups = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=False)
    # `--config` is not a dataclass field; HfArgumentParser returns it as an extra namespace.
    groups = [g for g in groups if dataclasses.is_dataclass(g)]
    model, data, train, schedule, *rest = groups
    return RunArgs(model, data, train, schedule), tuple(rest)


def run_args(preset: str = "tiny", **overrides: Any) -> RunArgs:
    """Build RunArgs in code (tests, notebooks): `run_args("tiny", num_layers=4, batch_size=8)`."""
    kwargs: dict[type, dict[str, Any]] = {g: {} for g in GROUPS}
    names = {g: {f.name for f in dataclasses.fields(g)} for g in GROUPS}
    for key, value in overrides.items():
        owners = [g for g in GROUPS if key in names[g]]
        if not owners:
            raise ConfigError(f"unknown option {key!r}")
        kwargs[owners[0]][key] = value
    kwargs[ModelArgs]["preset"] = preset
    return RunArgs(*(g(**kwargs[g]) for g in GROUPS))


@dataclass
class PlanArgs:
    """`pipelines/plan.py`: the cluster and corpus a run's plan is priced for (the model,
    stage plan, views, batch and store dtype are the run's own options)."""

    corpus_tokens: float | None = field(
        default=None,
        metadata={"help": "tokens of the training corpus (one view); default: the prepared data's"},
    )
    gpu: str | None = field(
        default=None,
        metadata={"help": "GPU kind from the peak table (A100, H100, L4, ...: docs/scaling.md)"},
    )
    gpus: int = field(default=1, metadata={"help": "processes (GPUs) over all nodes"})
    mfu: float = field(default=0.4, metadata={"help": "share of the peak a training step reaches"})
    forward_mfu: float | None = field(
        default=None, metadata={"help": "share of the peak a frozen forward reaches; default --mfu"}
    )
    train_tflops: float | None = field(
        default=None, metadata={"help": "measured TFLOP/s of a training step per process"}
    )
    forward_tflops: float | None = field(
        default=None, metadata={"help": "measured TFLOP/s of a frozen forward per process"}
    )
    read_gbps: float = field(
        default=float("inf"), metadata={"help": "store read GB/s over all processes"}
    )
    write_gbps: float = field(
        default=float("inf"), metadata={"help": "store write GB/s over all processes"}
    )
    stage_overhead_s: float = field(
        default=0.0,
        metadata={"help": "a stage's fixed seconds (loading, first steps, saving) added to each"},
    )
    io_overlap: bool = field(
        default=True,
        metadata={
            "help": "store I/O overlaps compute (a GPU fed by loader workers); false: they add "
            "up (one CPU thread does both)"
        },
    )
    measure: bool = field(
        default=False,
        metadata={
            "help": "measure this machine's rates first (one process, CPU seconds): the "
            "training step, a frozen forward, store writes and reads at the run's shape"
        },
    )
    json: bool = field(default=False, metadata={"help": "print JSON instead of tables"})

    def __post_init__(self) -> None:
        positive = ("gpus", "mfu", "forward_mfu", "train_tflops", "forward_tflops")
        for name in (*positive, "corpus_tokens", "read_gbps", "write_gbps"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")
