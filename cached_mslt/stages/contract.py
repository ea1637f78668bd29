"""The run's contract and a stage's prerequisites: what a later command must agree with
(`run_identity.json`), the previous stage finished and its weights as saved, the same
data, a reachable cache location. Refusals are `StageError`s that name the fix."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from accelerate import Accelerator, PartialState
from transformers import BertForMaskedLM

from cached_mslt.config import RunArgs
from cached_mslt.data import check_prepared
from cached_mslt.models import model_fingerprint
from cached_mslt.rundir import RunLayout, write_atomic
from cached_mslt.stages.plan import Stage, StagePlan
from storage import (
    check_reachable,
)

logger = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage cannot run as asked (missing previous stage, mismatched config...)."""


# Options that define what a run is (which layers its stages have, its model, its data); a
# later stage launched with different values would silently mix two runs, so it is refused.
# How long each stage trains (stage_tokens, stage_steps, joint_tokens) is not among them:
# an unfinished stage may be given more or fewer steps, and a comparison under a budget
# re-plans the later stages' lengths once stage 1 has shown what the budget buys.
RUN_IDENTITY = {
    "model": ("preset", "num_layers", "hidden_size", "num_attention_heads", "intermediate_size"),
    "data": ("prepared_dir", "seq_len", "mask_seed", "train_examples"),
    "schedule": ("stage_layers", "growth_init"),
}


def run_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The options of a run's configuration (as `RunArgs.to_dict`) that shape its plan, its
    model or its data: "group.key" -> value."""
    return {
        f"{group}.{key}": config.get(group, {}).get(key)
        for group, keys in RUN_IDENTITY.items()
        for key in keys
    }


def check_run_config(args: RunArgs, accelerator: Accelerator) -> None:
    """Write config.json and the run's contract on first use; afterwards refuse options
    that change the run's identity unless --override_run_config says so. The contract is
    `run_identity.json`, not config.json: an edited config.json passed back with --config
    would otherwise agree with itself (docs/reliability.md, the run's contract)."""
    layout = RunLayout.of(args)
    current = {**args.to_dict(), "train": {**args.to_dict()["train"], "override_run_config": False}}
    contract = _read_contract(layout)
    diffs = [
        f"{name}: run has {value!r}, now {run_identity(current)[name]!r}"
        for name, value in (contract or {}).items()
        if name in run_identity(current) and value != run_identity(current)[name]
    ]
    if diffs and not args.train.override_run_config:
        raise StageError(
            f"this configuration does not match the run in {args.train.run_dir} (its contract "
            f"{layout.identity}):\n  " + "\n  ".join(diffs) + f"\nexpected the run's own "
            f"options: use its config (--config {layout.config}, as first written) or start a "
            f"new run with another --run_dir; to change them on purpose add --override_run_config"
        )
    if accelerator.is_main_process:
        if diffs:
            logger.warning("--override_run_config: the run now has %s", "; ".join(diffs))
        layout.root.mkdir(parents=True, exist_ok=True)
        if contract is None or diffs:
            write_atomic(layout.config, json.dumps(current, indent=2, sort_keys=True))
        if diffs or not layout.identity.is_file():
            write_atomic(layout.identity, json.dumps(run_identity(current), indent=2))
    accelerator.wait_for_everyone()


def _read_contract(layout: RunLayout) -> dict[str, Any] | None:
    """The run's identity as first written; a run made before the contract existed has
    only its config.json."""
    if layout.identity.is_file():
        return json.loads(layout.identity.read_text())
    saved = layout.read_config()
    return None if saved is None else run_identity(saved)


def check_same_data(args: RunArgs, index: int, previous: dict | None, fingerprint: str) -> None:
    """Every stage of a run trains on the same prepared data (same fingerprint)."""
    if previous is None or previous["fingerprints"]["data"] == fingerprint:
        return
    raise StageError(
        f"stage {index - 1} trained on prepared data with fingerprint "
        f"{previous['fingerprints']['data'][:12]}, but {args.data.prepared_dir} now holds "
        f"{fingerprint[:12]}; expected the same data for every stage of a run. Restore that "
        f"data (`python pipelines/prepare_data.py --config {RunLayout.of(args).config}"
        f" --overwrite`, if the corpus is unchanged) or start a new run with another --run_dir"
    )


def check_saved_model(args: RunArgs, index: int, model: BertForMaskedLM) -> None:
    """Stage `index`'s saved weights are the ones its manifest recorded (manifests from
    before the record was kept are not checked): weights swapped or damaged under a finished
    stage would otherwise train every later stage on them without a word."""
    layout = RunLayout.of(args)
    expected = layout.read_manifest(index)["fingerprints"].get("model")
    found = model_fingerprint(model)
    if expected is None or found == expected:
        return
    raise StageError(
        f"{layout.model_dir(index)}/model.safetensors: these are not the weights stage {index} "
        f"saved (fingerprint {found[:12]}, its manifest records {expected[:12]}); expected "
        f"that stage's own model. Put its weights back, or retrain it: `rm -rf "
        f"{layout.stage_dir(index)} && accelerate launch pipelines/stage.py --config "
        f"{layout.config} --stage {index}`"
    )


def check_previous_stage_done(args: RunArgs, stage: Stage) -> None:
    """Stage K needs stage K-1 finished: checked before anything is written, so a refused
    attempt leaves no config.json and no stage-K/ that look like a started run."""
    if stage.index == 1:
        return
    layout = RunLayout.of(args)
    if layout.read_manifest(stage.index - 1) is None:
        raise StageError(
            f"stage {stage.index} needs stage {stage.index - 1}, which is not finished "
            f"({layout.manifest(stage.index - 1)} is missing); run `accelerate launch "
            f"pipelines/stage.py --config {layout.config} --stage {stage.index - 1}` first "
            "(or every stage in order: `accelerate launch pipelines/pretrain.py --config "
            f"{layout.config}`)"
        )


def write_run_config(args: RunArgs) -> tuple[Path, bool]:
    """Write the run's config.json without training, for every node's `--config` (checks the
    prepared data first, as a stage does). An existing one is kept if it is the same run
    and refused if not. Returns the path and whether it was written now."""
    check_prepared(args.data)
    path = RunLayout.of(args).config
    existed = path.exists()
    check_run_config(args, PartialState())
    return path, not existed


def check_cache_location(args: RunArgs, plan: StagePlan) -> None:
    """Fail before anything is written (no half-made run) if the plan caches and the cache
    location cannot be used: endpoint down, bucket missing (storage.StoreUnreachableError)."""
    if any(s.frozen_layers and s.cache != "never" for s in plan.stages):
        check_reachable(RunLayout.of(args).store_url(1), args.schedule.storage_options())
