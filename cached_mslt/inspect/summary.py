"""What a store is and whether it can be trusted: shapes, dtype, codec, size on disk,
completeness, fingerprints, provenance, and validity for the run it belongs to.

A store is valid for a run when its fingerprint says it was built from what the run
holds now: the weights of stage K's frozen bottom (recomputed from the stage's saved
checkpoint, not taken on trust from a manifest), the prepared data and masking seed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import zarr
from transformers import BertForMaskedLM

from cached_mslt.models import bottom_fingerprint
from cached_mslt.rundir import RunLayout
from storage import ActivationStore, StoreError, StoreNotFoundError, StoreSpec, check_reachable

# Exit status of `pipelines/inspect_cache.py`: the worst store decides. Argparse errors use 2.
EXIT_CODES = {"ok": 0, "incomplete": 3, "stale": 4, "corrupt": 5, "missing": 6}
PROVENANCE_KEYS = ("stage", "frozen_layers", "masking_seed", "built", "source_store")
PROVENANCE_KEYS += ("created_at", "completed_at", "package_version")


@dataclass
class Validity:
    """Whether a store matches a run. `valid` is None when it cannot be told (the stage
    has no checkpoint yet, or the prepared data is gone)."""

    run_dir: str
    stage: int | None
    valid: bool | None
    checks: dict[str, str] = field(default_factory=dict)


@dataclass
class StoreSummary:
    url: str
    status: str  # ok | incomplete | stale | corrupt | missing
    problem: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    shards_done: int | None = None
    num_shards: int | None = None
    disk_bytes: int | None = None
    logical_bytes: int | None = None
    fingerprint: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    validity: Validity | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    @property
    def compression_ratio(self) -> float | None:
        """Logical / on-disk bytes; None until every shard is written (a half-built store
        would look compressed)."""
        if self.disk_bytes and self.logical_bytes and self.shards_done == self.num_shards:
            return self.logical_bytes / self.disk_bytes
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "compression_ratio": self.compression_ratio}


def is_store(path: str | os.PathLike[str]) -> bool:
    meta = Path(path) / "zarr.json"
    try:
        return json.loads(meta.read_text()).get("attributes", {}).get("format") is not None
    except (OSError, ValueError):
        return False


def disk_bytes(url: str, storage_options: dict[str, Any] | None = None) -> int | None:
    """Bytes on disk (or in the object store) under the store's root."""
    try:
        options = (storage_options or {}) if "://" in url else {}
        fs, path = fsspec.core.url_to_fs(url, **options)
        return int(fs.du(path, total=True))
    except (OSError, ValueError):
        return None


def logical_bytes(spec: dict[str, Any]) -> int:
    """Uncompressed bytes of the four row arrays as stored: `hidden` at the store's own row
    size (an int8 row is one byte per value plus its per-token exponent), then the mask
    (1 byte per token), labels (4) and row index (8)."""
    s = StoreSpec.from_dict(spec)
    return s.num_rows * (s.row_bytes + s.seq_len * (1 + 4) + 8)


def _raw_attrs(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Root attributes read with plain Zarr: still readable when the store is damaged."""
    try:
        extra = {"storage_options": storage_options} if storage_options and "://" in url else {}
        return dict(zarr.open_group(url, mode="r", **extra).attrs)
    except Exception:  # whatever Zarr raises for a broken hierarchy: show what we have
        return {}


def summarize_store(
    url: str,
    run_dir: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> StoreSummary:
    """Summary of the store at `url`, checked against `run_dir` (default: the run the
    store sits in, if it is at `<run>/cache/stage-K`). Never raises for a bad store:
    the problem is in `status` and `problem`. An object store that cannot be reached at
    all (endpoint, bucket, credentials) raises storage.StoreUnreachableError: that is no
    store's status."""
    url = os.fspath(url)
    check_reachable(url, storage_options)
    try:
        store = ActivationStore.open(url, require_complete=False, storage_options=storage_options)
    except StoreNotFoundError as e:
        return StoreSummary(url, "missing", str(e))
    except StoreError as e:  # missing shard files, or unreadable (say a newer format)
        attrs = _raw_attrs(url, storage_options)
        return StoreSummary(
            url,
            "corrupt",
            str(e),
            spec=attrs.get("spec", {}),
            fingerprint=attrs.get("fingerprint", {}),
            provenance={k: attrs.get(k) for k in PROVENANCE_KEYS if k in attrs},
        )
    attrs = store.attrs
    spec = store.spec.to_dict()
    run = RunLayout(run_dir) if run_dir is not None else RunLayout.of_store(url)
    summary = StoreSummary(
        url,
        "ok",
        spec=spec,
        shards_done=len(store.shards_done()),
        num_shards=store.num_shards,
        disk_bytes=disk_bytes(url, storage_options),
        logical_bytes=logical_bytes(spec),
        fingerprint=store.fingerprint,
        provenance={k: attrs.get(k) for k in PROVENANCE_KEYS if k in attrs},
    )
    # A write-through store holds the units its stage has read (docs/cache-format.md): ok,
    # and the analyses read those ("built write-through", "shards done k/n" say so).
    if not store.is_complete and attrs.get("built") != "write-through":
        summary.status = "incomplete"
        summary.problem = (
            f"{summary.shards_done}/{summary.num_shards} shards written and the build never "
            f"committed; {rebuild_hint(run, attrs.get('stage'))}"
        )
    if run is not None:
        summary.validity = check_validity(store.fingerprint, attrs.get("stage"), run)
        if summary.validity.valid is False and summary.status == "ok":
            summary.status = "stale"
            checks = summary.validity.checks.items()
            bad = [f"{k}: {v}" for k, v in checks if v.startswith("differs")]
            summary.problem = (
                f"not valid for run {run.root}: {'; '.join(bad)}. "
                f"{rebuild_hint(run, attrs.get('stage'))}"
            )
    return summary


def rebuild_hint(run: RunLayout | None, stage: int | None) -> str:
    """The command that rebuilds a store, finished stage or not: `--rebuild_cache` (a
    rerun without it answers "already done, skipping" and leaves the store as it is)."""
    if run is None or stage is None:
        return "rebuild it: rerun its stage with --rebuild_cache"
    return (
        f"rebuild it: accelerate launch pipelines/stage.py --config {run.config} "
        f"--stage {stage} --rebuild_cache"
    )


def prepared_dir_of(run: RunLayout) -> Path | None:
    """The run's prepared data directory. config.json records it as given (usually relative
    to the repository the run was started from): try there, then beside the run."""
    given = Path(run.read_config()["data"]["prepared_dir"])
    candidates = [given] if given.is_absolute() else [given, run.root.parent.parent / given]
    return next((p for p in candidates if (p / "manifest.json").is_file()), None)


def checkpoint_bottom_fingerprint(checkpoint: Path, frozen_layers: int) -> str:
    """Fingerprint of the first `frozen_layers` layers (and embeddings) of a checkpoint,
    computed as the cache build computes it (cached_mslt.stages.cache.store_fingerprint)."""
    model = BertForMaskedLM.from_pretrained(checkpoint)
    return bottom_fingerprint(model, frozen_layers)


def check_validity(fingerprint: dict[str, str], stage: int | None, run: RunLayout) -> Validity:
    """Compare what the store was built from with what the run holds now."""
    out = Validity(str(run.root), stage, None)
    checkpoint = run.model_dir(stage)
    frozen = int(fingerprint.get("frozen_layers", 0))
    if stage is None or not (checkpoint / "config.json").is_file():
        out.checks["weights"] = f"unchecked: {checkpoint} does not exist (stage not finished)"
    else:
        found = checkpoint_bottom_fingerprint(checkpoint, frozen)
        out.checks["weights"] = _compare(
            fingerprint.get("weights"), found, f"stage-{stage}/model, {frozen} frozen layers"
        )
    prepared = prepared_dir_of(run)
    if prepared is None:
        out.checks["data"] = "unchecked: the run's prepared data directory is gone"
    else:
        manifest = json.loads((prepared / "manifest.json").read_text())
        out.checks["data"] = _compare(
            fingerprint.get("data"), manifest["fingerprint"], str(prepared)
        )
        out.checks["mask_seed"] = _compare(
            fingerprint.get("mask_seed"), str(manifest["mask_seed"]), "prepared data"
        )
    verdicts = [v.split(":")[0] for v in out.checks.values()]
    if "differs" in verdicts:
        out.valid = False
    elif all(v == "matches" for v in verdicts):
        out.valid = True
    return out


def _compare(stored: str | None, found: str, where: str) -> str:
    if stored == found:
        return f"matches: {where}"
    return f"differs: store has {str(stored)[:12]}, {where} has {found[:12]}"


@dataclass
class StageEntry:
    stage: int
    mode: str  # cached | write-through | live | unfinished
    num_layers: int | None
    frozen_layers: int | None
    store: StoreSummary | None


def summarize_run(
    run_dir: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> list[StageEntry]:
    """Every stage of a run: finished stages from their manifests, plus any store under
    `cache/` whose stage has not finished (a build in progress or a crashed one).
    `storage_options` reach stores on an object store (default: run_storage_options)."""
    run = RunLayout(run_dir)
    if storage_options is None:
        storage_options = run_storage_options(run)
    stages: dict[int, StageEntry] = {}
    for m in run.stages():
        index = m["stage"]["index"]
        url = m["cache"].get("url") if m["mode"] in ("cached", "write-through") else None
        stages[index] = StageEntry(
            index,
            m["mode"],
            m["stage"]["num_layers"],
            m["stage"]["frozen_layers"],
            summarize_store(_resolve(url, run, index), run.root, storage_options) if url else None,
        )
    for index, store_dir in run.local_stores().items():
        if index not in stages:
            stages[index] = StageEntry(
                index, "unfinished", None, None, summarize_store(str(store_dir), run.root)
            )
    if not stages:
        raise FileNotFoundError(
            f"{run.root} holds no finished stage and no store under cache/; is it a run directory "
            "(runs/<preset>) or a store (runs/<preset>/cache/stage-K)?"
        )
    return [stages[i] for i in sorted(stages)]


def run_storage_options(run: RunLayout, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The storage options a run's stores are read with: what its config.json recorded of
    --cache_storage_options (the endpoint; credentials are never saved and come from the
    environment or `given`), with `given` on top."""
    saved = ((run.read_config() or {}).get("schedule") or {}).get("cache_storage_options")
    return {**(json.loads(saved) if saved else {}), **(given or {})}


def _resolve(url: str, run: RunLayout, index: int) -> str:
    """Where stage K's store is now: `<run>/cache/stage-K` if there (the run's own layout,
    which survives moving the run), else the URL the manifest recorded, which may be
    relative to wherever the run was started."""
    beside = run.local_store(index)
    return str(beside) if is_store(beside) else url
