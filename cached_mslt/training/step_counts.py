"""What a training step counts without waiting for the device: a batch's tokens and masked
positions counted on the host before the copy, and the losses and non-finite steps added
up on the device until a sync reads them (docs/design.md, the hot path)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cached_mslt.models import IGNORE_INDEX, masked_targets


@dataclass
class BatchCounts:
    """What the host knows of a batch before it moves to the device: counting it there
    costs the step no wait for the device."""

    tokens: int  # attended positions
    masked: int  # positions with a label
    padded: bool  # some position does not attend
    # frozen-layer forwards a write-through step runs for rows its store lacks, in tokens
    frozen_layer_tokens: int = 0


def padded_gather_per_row(mask_prob: float, seq_len: int) -> int:
    """Gather positions per row of a compiled top: the most static masking picks in a row,
    so every full batch has one gather shape and the top never recompiles (docs/design.md,
    the hot path)."""
    return max(1, round(mask_prob * seq_len))


def host_batch(
    batch: dict[str, torch.Tensor], per_row: int | None
) -> tuple[BatchCounts, dict[str, Any]]:
    """Count a batch still on the host (numpy: no tensor is read) and add the flat targets
    of its masked positions, so the head's gather has a shape the host knows. An unpadded
    batch loses its attention mask: transformers would drop it too, after checking it on
    the device (`padding_mask.all()`, a wait per layer stack on a GPU)."""
    attends = batch["attention_mask"].numpy()
    tokens = int(np.count_nonzero(attends))
    masked = int(np.count_nonzero(batch["labels"].numpy() != IGNORE_INDEX))
    counts = BatchCounts(tokens, masked, padded=tokens != attends.size)
    batch = {**batch, **masked_targets(batch["labels"], per_row)}
    if not counts.padded:
        batch["attention_mask"] = None
    return counts, batch


class Tally:
    """What the steps add up on the device between two reads, so that no step waits for
    it: the log window's loss sum, this optimizer step's loss sum so far, the run of
    consecutive skipped (non-finite) optimizer steps, the longest run since the last read,
    and the last skipped step's loss sum and gradient norm (for the divergence message)."""

    def __init__(self, device: torch.device):
        values = torch.zeros(6, dtype=torch.float64, device=device)
        self.values = values
        self.loss, self.step_loss, self.run, self.worst = values[0], values[1], values[2], values[3]
        self.bad_loss, self.bad_norm = values[4], values[5]
        self.bad_norm.fill_(math.nan)  # nan: not measured

    def add(self, loss: torch.Tensor, masked: int) -> None:
        loss_sum = loss.detach().double() * masked
        self.loss.add_(loss_sum)
        self.step_loss.add_(loss_sum)

    def end_step(self, norm: torch.Tensor | None) -> torch.Tensor:
        """Close an optimizer step; returns whether to skip it (a bool on the device)."""
        bad = ~torch.isfinite(self.step_loss)
        if norm is not None:
            norm = norm.detach().double()
            bad = bad | ~torch.isfinite(norm)
            self.bad_norm.copy_(torch.where(bad, norm, self.bad_norm))
        self.bad_loss.copy_(torch.where(bad, self.step_loss, self.bad_loss))
        self.run.copy_((self.run + 1) * bad)
        self.worst.copy_(torch.maximum(self.worst, self.run))
        self.step_loss.zero_()
        return bad


@dataclass
class Window:
    """Host counts not yet logged (masked) or, with several processes, not yet in the
    clock (tokens, FLOPs): this rank's own, until a sync sums them over ranks."""

    masked: int = 0
    tokens: int = 0
    flops: float = 0.0


@dataclass
class Read:
    """The device's counters as the last sync read them (summed or maxed over ranks)."""

    loss_sum: float = 0.0
    masked: int = 0
    run: int = 0  # consecutive skipped steps up to the sync
