"""The MSLT stage plan: which layers exist, which are frozen and how long each stage trains."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cached_mslt.config import PRESETS, ConfigError, RunArgs


@dataclass(frozen=True)
class Stage:
    index: int  # 1-based, as in `--stage K`
    num_layers: int  # encoder depth during this stage
    frozen_layers: int  # bottom layers run forward only (0: nothing frozen, embeddings train)
    tokens: int | None  # training budget in tokens (None when `steps` is set)
    steps: int | None
    cache: str  # auto | write-through | always (eager build) | never (live)
    joint: bool = False  # final phase: every layer trains again, live
    dropout: float | None = None  # None: the model's own (--dropout)

    @property
    def name(self) -> str:
        return "joint" if self.joint else f"stage-{self.index}"

    @property
    def trainable_layers(self) -> int:
        return self.num_layers - self.frozen_layers

    def to_dict(self) -> dict:
        return asdict(self) | {"name": self.name}


def _per_stage(text: str | None, count: int, what: str) -> list[float] | None:
    """A per-stage option's values (checked at parse time, config.py): one for every stage,
    or one per stage."""
    if text is None:
        return None
    values = [float(v) for v in str(text).replace(" ", "").split(",") if v]
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        raise ConfigError(f"{what} has {len(values)} values for {count} stages; give 1 or {count}")
    return values


def _numbers(text: str | None, count: int, what: str) -> list[float] | None:
    values = _per_stage(text, count, what)
    if values and any(v <= 0 for v in values):
        raise ConfigError(f"{what} values must be positive, got {values}")
    return values


@dataclass(frozen=True)
class StagePlan:
    stages: tuple[Stage, ...]

    @classmethod
    def from_args(cls, args: RunArgs) -> StagePlan:
        s = args.schedule
        try:
            layers = [int(v) for v in s.stage_layers.split(",") if v.strip()]
        except ValueError as e:
            raise ConfigError(
                f"stage_layers must be comma-separated integers: {s.stage_layers!r}"
            ) from e
        if not layers or any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 1:
            raise ConfigError(f"stage_layers must be positive and strictly increasing: {layers}")
        if layers[-1] != args.model.num_layers:
            raise ConfigError(
                f"the last stage has {layers[-1]} layers but the model has num_layers="
                f"{args.model.num_layers}; make them agree"
            )
        steps = _numbers(s.stage_steps, len(layers), "stage_steps")
        try:
            tokens = None if steps else _numbers(s.stage_tokens, len(layers), "stage_tokens")
        except ConfigError as e:
            if s.stage_tokens != PRESETS[args.model.preset]["stage_tokens"]:
                raise
            raise ConfigError(
                f"{e}: the {args.model.preset} preset's stage_tokens ({s.stage_tokens}) are for "
                f"its own plan; with --stage_layers {s.stage_layers} pass --stage_tokens too"
            ) from e
        dropout = _per_stage(s.stage_dropout, len(layers), "stage_dropout")
        stages = []
        for i, n in enumerate(layers):
            frozen = layers[i - 1] if i else 0
            stages.append(
                Stage(
                    index=i + 1,
                    num_layers=n,
                    frozen_layers=frozen,
                    tokens=int(tokens[i]) if tokens else None,
                    steps=int(steps[i]) if steps else None,
                    # Nothing is frozen in stage 1, so there is nothing to cache.
                    cache="never" if frozen == 0 else s.cache,
                    dropout=dropout[i] if dropout else None,
                )
            )
        if s.joint_tokens > 0:
            stages.append(
                Stage(
                    index=len(layers) + 1,
                    num_layers=layers[-1],
                    frozen_layers=0,
                    tokens=int(s.joint_tokens),
                    steps=None,
                    cache="never",
                    joint=True,
                )
            )
        return cls(tuple(stages))

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, index: int) -> Stage:
        """Stage by its 1-based index."""
        if not 1 <= index <= len(self.stages):
            raise ConfigError(
                f"stage {index} does not exist; this plan has stages 1..{len(self.stages)}"
            )
        return self.stages[index - 1]

    def to_list(self) -> list[dict]:
        return [st.to_dict() for st in self.stages]
