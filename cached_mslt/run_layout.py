"""Where everything of a run lives: the one place that knows the run-directory layout.

    <run>/config.json              the run's configuration; later stages must agree with it
    <run>/metrics.jsonl            one line per log step, all stages (or phases)
    <run>/stage-K/model/           save_pretrained checkpoint (plus tokenizer) at stage end
    <run>/stage-K/checkpoint/      accelerate save_state for resuming mid-stage (removed at end)
    <run>/stage-K/owner.lock       the stage's owner while it runs
    <run>/stage-K/manifest.json    written last: the stage is done when it exists
    <run>/cache/stage-K/           stage K's activation store (or <cache_url>/stage-K)
    <run>/summary.md, val_loss.png the end-of-run report
    <run>/final/, result.json      a comparison method's final model and outcome

Writers (stages, the comparison harness) and readers (inspect, evaluation, compare) all
ask a `RunLayout` for paths instead of joining strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG = "config.json"
MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
RESULT = "result.json"
LOCK_FILE = "owner.lock"
STAGE_PREFIX = "stage-"


@dataclass(frozen=True)
class RunLayout:
    root: Path
    cache_url: str | None = None  # --cache_url: stores live there instead of <run>/cache

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, args: Any) -> RunLayout:
        """The layout of the run `args` (a RunArgs) writes."""
        return cls(Path(args.train.run_dir), args.schedule.cache_url)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunLayout | None:
        """The run that wrote a checkpoint: the nearest of its parent (a method's `final/`)
        and grandparent (a stage's `stage-K/model/`) that holds a config.json."""
        for parent in Path(checkpoint).resolve().parents[:2]:
            if (parent / CONFIG).is_file():
                return cls(parent)
        return None

    @classmethod
    def of_store(cls, url: str) -> RunLayout | None:
        """The run a local store at `<run>/cache/stage-K` belongs to, if it is one."""
        path = Path(url)
        if "://" in url or path.parent.name != "cache":
            return None
        run = cls(path.parent.parent)
        return run if run.config.is_file() else None

    # --- files of the run -------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def peak(self) -> Path:
        """The FLOP/s the run's MFU is measured against (cached_mslt.flops.Peak)."""
        return self.root / "peak.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.md"

    @property
    def loss_plot(self) -> Path:
        return self.root / "val_loss.png"

    @property
    def result(self) -> Path:
        return self.root / RESULT

    @property
    def final_model(self) -> Path:
        return self.root / "final"

    def read_config(self) -> dict[str, Any] | None:
        return json.loads(self.config.read_text()) if self.config.is_file() else None

    def read_result(self) -> dict[str, Any] | None:
        return json.loads(self.result.read_text()) if self.result.is_file() else None

    # --- stages ---------------------------------------------------------------------------

    def stage_dir(self, index: int) -> Path:
        return self.root / f"{STAGE_PREFIX}{index}"

    def model_dir(self, index: int) -> Path:
        return self.stage_dir(index) / "model"

    def checkpoint_dir(self, index: int) -> Path:
        return self.stage_dir(index) / "checkpoint"

    def manifest(self, index: int) -> Path:
        return self.stage_dir(index) / MANIFEST

    def lock(self, index: int) -> Path:
        return self.stage_dir(index) / LOCK_FILE

    def read_manifest(self, index: int) -> dict[str, Any] | None:
        path = self.manifest(index)
        return json.loads(path.read_text()) if path.exists() else None

    def stages(self) -> list[dict[str, Any]]:
        """Manifests of the finished stages, in stage order."""
        found = [json.loads(p.read_text()) for p in self.root.glob(f"{STAGE_PREFIX}*/{MANIFEST}")]
        return sorted(found, key=lambda m: m["stage"]["index"])

    # --- stores ---------------------------------------------------------------------------

    def local_store(self, index: int) -> Path:
        """Stage K's store in the run's own directory (where it is unless --cache_url)."""
        return self.root / "cache" / f"{STAGE_PREFIX}{index}"

    def store_url(self, index: int) -> str:
        """Stage K's store: under --cache_url (any fsspec URL) or <run>/cache."""
        if self.cache_url:
            return f"{self.cache_url.rstrip('/')}/{STAGE_PREFIX}{index}"
        return str(self.local_store(index))

    def local_stores(self) -> dict[int, Path]:
        """Stage index -> store directory, for every store under <run>/cache."""
        dirs = (self.root / "cache").glob(f"{STAGE_PREFIX}*")
        return {int(d.name.removeprefix(STAGE_PREFIX)): d for d in sorted(dirs)}
