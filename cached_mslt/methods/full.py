"""The baseline: the whole model trained from scratch on the whole budget."""

from __future__ import annotations

from torch import nn


def run(ctx) -> nn.Module:
    model = ctx.new_model(ctx.args.model.num_layers)
    ctx.train("full", model, 1.0)
    return model
