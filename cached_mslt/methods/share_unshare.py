"""Share, then unshare (Yang et al., arXiv 2110.03848).

Phase 1 trains an encoder whose L positions all run one block (one parameter set,
ALBERT-style cross-layer sharing); at the switch point the block is untied into L
independent copies, each starting equal to it, and training continues (docs/methods.md: no
public code; the switch point and the optimizer hand-over are this project's choice).

The optimizer hand-over: `unshare_optimizer_state` gives every untied copy its own
clone of the shared block's AdamW moments, so the first steps after the switch move
all copies the way the shared block was moving; pass nothing and the new optimizer
starts from zero state instead.

Checkpoints: `save_pretrained` refuses a shared model (safetensors will not store one
tensor under L names). Save `unshare_layers(model)` instead: a plain BertForMaskedLM with
L equal layers that computes the same function and loads anywhere.
"""

from __future__ import annotations

import re

import torch
from transformers import BertForMaskedLM

from cached_mslt.methods.harness import MethodContext
from cached_mslt.models import clone_model, copy_layer, set_encoder_layers

_LAYER_PREFIX = re.compile(r"^bert\.encoder\.layer\.\d+\.")


def share_layers(model: BertForMaskedLM) -> BertForMaskedLM:
    """Return a copy of `model` whose L encoder positions all hold its layer 0 (one module object).

    Depth (compute per token) stays L; the parameter count drops to one layer's worth,
    since `parameters()` yields a module reached twice only once.
    """
    new = clone_model(model)
    block = new.bert.encoder.layer[0]
    return set_encoder_layers(new, [block] * new.config.num_hidden_layers)


def is_shared(model: BertForMaskedLM) -> bool:
    """True if every encoder position runs the same module object."""
    layers = list(model.bert.encoder.layer)
    return all(layer is layers[0] for layer in layers)


def unshare_layers(model: BertForMaskedLM) -> BertForMaskedLM:
    """Return a copy of a shared `model` with L independent layers, each equal to the shared block."""
    if not is_shared(model):
        raise ValueError("unshare_layers expects a model made by share_layers (one shared block)")
    new = clone_model(model)
    block = new.bert.encoder.layer[0]
    layers = [copy_layer(block, new.config) for _ in range(new.config.num_hidden_layers)]
    return set_encoder_layers(new, layers)


def unshare_optimizer_state(
    shared_optimizer: torch.optim.Optimizer,
    shared_model: BertForMaskedLM,
    new_optimizer: torch.optim.Optimizer,
    unshared_model: BertForMaskedLM,
) -> int:
    """Seed `new_optimizer` (built on `unshared_model`) with clones of the shared run's state.

    Each parameter of untied layer i takes the state of the shared block's matching
    parameter; parameters outside the encoder take their own old state. Works for any
    optimizer whose per-parameter state is a dict of tensors and numbers (AdamW: `step`,
    `exp_avg`, `exp_avg_sq`), including Accelerate's wrapper, which exposes `.state`.
    Returns how many parameters received state.
    """
    # The shared model names its block's parameters once, under layer 0.
    old = dict(shared_model.named_parameters())
    copied = 0
    for name, param in unshared_model.named_parameters():
        source = old.get(_LAYER_PREFIX.sub("bert.encoder.layer.0.", name))
        state = shared_optimizer.state.get(source) if source is not None else None
        if state:
            new_optimizer.state[param] = {
                k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()
            }
            copied += 1
    return copied


def run(ctx: MethodContext) -> BertForMaskedLM:
    """One shared block for the first `share_fraction` of the budget, then L untied copies
    that keep the shared block's AdamW state, trained to the end of the budget."""
    shared = share_layers(ctx.new_model(ctx.args.model.num_layers))
    ctx.train("shared", shared, ctx.method.share_fraction)
    shared_optimizer = ctx.last_optimizer
    model = unshare_layers(shared)
    ctx.train(
        "unshared",
        model,
        1.0,
        init_optimizer=lambda opt: (
            unshare_optimizer_state(shared_optimizer, shared, opt, model)
            if shared_optimizer is not None
            else None
        ),
    )
    return model
