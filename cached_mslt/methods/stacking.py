"""Progressive stacking (Gong et al., ICML 2019): double the encoder depth by copying.

Following `double.py` in gonglinyuan/StackingBERT, layer l of an L-layer encoder is
copied to position l + L, so the new top half is an exact copy of the trained stack;
embeddings and the MLM head are kept as they are. Every layer trains after a doubling
and the published run resets the optimizer state (PAPERS.md); the loop builds a fresh
optimizer for the new phase.
"""

from __future__ import annotations

from transformers import BertForMaskedLM

from cached_mslt.methods._layers import clone_model, copy_layer, set_encoder_layers


def stack_double(model: BertForMaskedLM) -> BertForMaskedLM:
    """Return a 2L-layer copy of `model` whose layer l + L equals layer l; `model` is unchanged."""
    new = clone_model(model)
    bottom = list(new.bert.encoder.layer)
    top = [copy_layer(layer, new.config) for layer in bottom]
    return set_encoder_layers(new, bottom + top)
