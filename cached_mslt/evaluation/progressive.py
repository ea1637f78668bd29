"""Progressive freezing during fine-tuning (`--freeze progressive`): MSLT's schedule run
downwards. Every interval AutoFreeze's test (`frozen_top.AutoFreezeTest`) decides whether
the lowest trainable layers have converged; those that have are frozen for real (no
gradient, eval mode, out of the optimizer), the run's store is pushed through just them
(an incremental build, `task_store.build_task_stores` with a source), and the top trains on
from the deeper store. Every decision is logged and returned with the run's results."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel

from cached_mslt.evaluation.frozen_top import AutoFreezeTest, ClassifierTop, FrozenRows, freeze_to
from cached_mslt.evaluation.task_store import TaskStores

# (model, new depth, the store it extends) -> the stores at the new depth, on every process
Extend = Callable[[PreTrainedModel, int, TaskStores], TaskStores]


def _drop_frozen(optimizer: torch.optim.Optimizer) -> None:
    """Take parameters that no longer train out of the optimizer, with their moments (as
    Composer's layer freezing does): frozen means absent from the optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
    for group in inner.param_groups:
        for p in [p for p in group["params"] if not p.requires_grad]:
            inner.state.pop(p, None)
        group["params"] = [p for p in group["params"] if p.requires_grad]


class ProgressiveFreezing:
    """One run's freezing: the rows the top reads, the stores at each depth reached, the
    test and its decisions."""

    def __init__(self, rows: FrozenRows, base: TaskStores, extend: Extend, test: AutoFreezeTest):
        self.rows, self.extend, self.test = rows, extend, test
        self.stores = {base.depth: base}
        self.decisions: list[dict[str, Any]] = []
        self.build_cpu_s = 0.0
        self.rows.load(base)

    @property
    def depth(self) -> int:
        return self.rows.depth

    def start(self, accelerator: Accelerator, log: Callable, interval: int) -> None:
        self.accelerator, self.log, self.interval = accelerator, log, max(1, interval)

    def after_backward(self, model: torch.nn.Module) -> None:
        # Under DDP the gradients are already averaged: every rank decides alike.
        self.test.observe(self.accelerator.unwrap_model(model).model, self.depth)

    def after_step(self, model, optimizer, step: int, epoch: int) -> torch.nn.Module:
        """At the end of an interval: decide, and freeze what converged. Returns the top
        to train next (a new, smaller one after a freeze)."""
        if step % self.interval:
            return model
        depth, record = self.test.decide(self.depth)
        record = {"step": step, "epoch": epoch, **record}
        self.decisions.append(record)
        self.log({"freeze_decision": record})
        if depth == self.depth:
            return model
        classifier = self.accelerator.unwrap_model(model).model
        freeze_to(classifier, depth)
        _drop_frozen(optimizer)
        stores = self.extend(classifier, depth, self.stores[self.depth])
        self.build_cpu_s += stores.stats["cpu_s"]
        self.stores[depth] = stores
        self.rows.load(stores)
        top = self.accelerator.prepare_model(ClassifierTop(classifier, depth))
        top.train()
        return top

    def restore(self, model: torch.nn.Module, depth: int) -> torch.nn.Module:
        """The top at `depth` (the best epoch's), reading that depth's store, for testing."""
        self.rows.load(self.stores[depth])
        return ClassifierTop(self.accelerator.unwrap_model(model).model, depth)

    def summary(self, best_depth: int) -> dict[str, Any]:
        return {
            "freeze_rule": (
                f"AutoFreeze gradient-norm test every {self.interval} steps: freeze the lowest "
                f"trainable layers whose change rate is <= the {self.test.percentile:g}th "
                f"percentile; keep the top {self.test.keep}"
            ),
            "freeze_decisions": self.decisions,
            "final_depth": self.depth,
            "best_depth": best_depth,
            "extension_cpu_s": self.build_cpu_s,
        }
