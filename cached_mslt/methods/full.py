"""The baseline: the whole model trained from scratch on the whole budget."""

from __future__ import annotations

from torch import nn

from cached_mslt.methods.harness import MethodContext


def run(ctx: MethodContext) -> nn.Module:
    model = ctx.new_model(ctx.args.model.num_layers)
    ctx.train("full", model, 1.0)
    return model
