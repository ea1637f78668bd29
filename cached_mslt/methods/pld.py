"""Progressive layer dropping (Zhang & He, NeurIPS 2020, arXiv 2010.13369): the schedule.

Schedules (docs/methods.md; DeepSpeed `runtime/progressive_layer_drop.py`):

- over time, the keep probability theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar;
- over depth, layer i of L (0-indexed) is kept with p_i = 1 - i * (1 - theta) / L, so
  layer 0 is always kept. (DeepSpeedExamples' `modelingpreln_layerdrop.py` draws layer i
  with p_i but rescales it by p_{i+1}, an off-by-one; we rescale by p_i, as the paper says.)

The model it trains, a pre-LN BERT that skips layers, is `cached_mslt.models.preln_bert`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cached_mslt.methods.harness import MethodContext
from cached_mslt.models import (
    PreLNBertConfig,
    PreLNBertForMaskedLM,
    bert_config,
    layer_keep_probs,
    mlm_head_loss,
)

THETA_BAR = 0.5  # DeepSpeed / paper defaults
GAMMA = 0.001

__all__ = ["GAMMA", "THETA_BAR", "keep_prob", "layer_keep_probs", "run"]


def keep_prob(t: float, theta_bar: float = THETA_BAR, gamma: float = GAMMA) -> float:
    """theta(t): the keep probability of the deepest layers' schedule at step t."""
    return (1.0 - theta_bar) * math.exp(-gamma * t) + theta_bar


class _MaskedLMLoss(nn.Module):
    """The pre-LN model behind the shared loop's interface: (labels, mask, input_ids) ->
    (mean loss, masked count), as `cached_mslt.models.bert.TopModel` with nothing frozen."""

    def __init__(self, model: PreLNBertForMaskedLM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        labels,
        attention_mask=None,
        hidden_states=None,
        input_ids=None,
        masked_positions=None,
        masked_labels=None,
    ):
        hidden = self.model.bert(input_ids, attention_mask).last_hidden_state
        targets = None if masked_positions is None else (masked_positions, masked_labels)
        return mlm_head_loss(self.model, hidden, labels, targets)


def run(ctx: MethodContext) -> PreLNBertForMaskedLM:
    """The whole pre-LN model on the whole budget; each step sets theta(step), and the FLOP
    counter charges only the layers that ran."""
    base = bert_config(ctx.args.model, ctx.data.manifest["vocab_size"], ctx.args.model.num_layers)
    config = PreLNBertConfig(**base.to_diff_dict(), layer_drop_seed=ctx.args.train.seed)
    torch.manual_seed(ctx.args.train.seed)
    model = PreLNBertForMaskedLM(config)
    m = ctx.method
    ctx.train(
        "pld",
        model,
        1.0,
        before_step=lambda step: model.set_theta(keep_prob(step, m.pld_theta_bar, m.pld_gamma)),
        trainable=_MaskedLMLoss(model),
        trained_layers=lambda: model.last_layers_run,
    )
    return model
