"""Encoder-layer surgery shared by the structural operators.

All operators work on `transformers.BertForMaskedLM` (module names in docs/library-facts.md):
the encoder layers live in `model.bert.encoder.layer`, a `ModuleList`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn
from transformers import BertForMaskedLM, PretrainedConfig


def copy_layer(layer: nn.Module, config: PretrainedConfig) -> nn.Module:
    """Deep copy of one encoder layer that still points at the model's `config` object.

    A plain deepcopy gives the copy its own config, so a later
    `model.set_attn_implementation(...)` would miss it (docs/library-facts.md, "Growth").
    """
    return copy.deepcopy(layer, memo={id(config): config})


def set_encoder_layers(model: BertForMaskedLM, layers: Sequence[nn.Module]) -> BertForMaskedLM:
    """Install `layers` as the encoder, in place, and keep the config and layer indices in step."""
    model.bert.encoder.layer = nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)
    # layer_idx only addresses a KV cache (decoder use), but keep it truthful. A block
    # shared by several positions keeps the index of its first position.
    for i in reversed(range(len(layers))):
        layers[i].attention.self.layer_idx = i
    return model


def clone_model(model: BertForMaskedLM) -> BertForMaskedLM:
    """An independent copy: operators are pure, the caller's model is left untouched.

    One deepcopy call shares its memo across the whole model, so the copy keeps the
    same structure as the original: one config object, the decoder tied to the word
    embeddings, a shared block still shared.
    """
    return copy.deepcopy(model)
