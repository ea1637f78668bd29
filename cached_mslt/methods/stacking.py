"""Progressive stacking (Gong et al., ICML 2019): double the encoder depth by copying.

Following `double.py` in gonglinyuan/StackingBERT, layer l of an L-layer encoder is
copied to position l + L, so the new top half is an exact copy of the trained stack;
embeddings and the MLM head are kept as they are. Every layer trains after a doubling
and the published run resets the optimizer state (docs/methods.md); the loop builds a fresh
optimizer for the new phase.
"""

from __future__ import annotations

from transformers import BertForMaskedLM

from cached_mslt.methods.harness import MethodContext
from cached_mslt.models import clone_model, copy_layer, set_encoder_layers


def stack_double(model: BertForMaskedLM) -> BertForMaskedLM:
    """Return a 2L-layer copy of `model` whose layer l + L equals layer l; `model` is unchanged."""
    new = clone_model(model)
    bottom = list(new.bert.encoder.layer)
    top = [copy_layer(layer, new.config) for layer in bottom]
    return set_encoder_layers(new, bottom + top)


def run(ctx: MethodContext) -> BertForMaskedLM:
    """3 -> 6 -> 12 by doubling, every layer training, optimizer state reset at each doubling
    (as published); budget shares per depth from `stacking_fractions`, the rest at full depth."""
    layers = [int(v) for v in ctx.method.stacking_layers.split(",")]
    fractions = [float(v) for v in ctx.method.stacking_fractions.split(",")]
    if (
        any(b != 2 * a for a, b in zip(layers, layers[1:]))
        or layers[-1] != ctx.args.model.num_layers
    ):
        raise ValueError(
            f"stacking_layers {layers} must double at each step and end at num_layers="
            f"{ctx.args.model.num_layers}"
        )
    if len(fractions) != len(layers) - 1:
        raise ValueError(f"stacking_fractions needs {len(layers) - 1} values, got {fractions}")
    model = ctx.new_model(layers[0])
    for i, depth in enumerate(layers):
        if i:
            model = stack_double(model)
        share = fractions[i] if i < len(fractions) else 1.0  # the last depth takes the rest
        ctx.train(f"{depth}-layers", model, share)
    return model
