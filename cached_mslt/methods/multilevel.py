"""Multi-level V-cycle operators (Zou, Zhang & Deng, ICLR 2024, arXiv 2404.07999).

Depth only, following `map_tools/mapper.py` in Photooon/Multi-Level-Training-Framework:

- coalescing (down): small layer i is the average of the large layers in group i;
  the default groups are adjacent pairs (2i, 2i+1), i.e. the code's default map
  R[i, 2i] = R[i, 2i+1] = 1/2 (its example configs also use (i, i + L/2); pass
  `groups=` for that). Embeddings and the MLM head are copied unchanged.
- de-coalescing (up): with G = row-normalised R^T, each large layer takes a copy of the
  small layer it was merged into; embeddings and head copied.
- interpolation: theta = (1 - alpha) * theta_large_before + alpha * theta_decoalesced,
  breaking the symmetry de-coalescing creates (the pair of copies). The code defaults to
  alpha = 0.25; its BERT/GPT examples use 0.5, our default.

Width coalescing (merging heads/neurons with U = F_in W F_out, embeddings scaled by 2
and back by 0.5) is not implemented: it changes `hidden_size`, which the shared loop,
the tied decoder and the activation cache all take as fixed within a run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import BertForMaskedLM

from cached_mslt.methods.harness import MethodContext
from cached_mslt.models import clone_model, copy_layer, set_encoder_layers

DEFAULT_ALPHA = 0.5  # the BERT/GPT examples of the reference code (docs/methods.md)

Groups = Sequence[Sequence[int]]


def adjacent_pairs(num_layers: int) -> list[list[int]]:
    """The reference code's default depth map: small layer i merges large layers 2i and 2i+1."""
    if num_layers % 2:
        raise ValueError(f"depth coalescing by pairs needs an even layer count, got {num_layers}")
    return [[2 * i, 2 * i + 1] for i in range(num_layers // 2)]


def _check_groups(groups: Groups, num_layers: int) -> None:
    # De-coalescing needs every large layer in exactly one group, else G has an empty row.
    flat = sorted(j for group in groups for j in group)
    if flat != list(range(num_layers)):
        raise ValueError(f"groups {groups} must partition the {num_layers} large layers")


def coalesce_depth(model: BertForMaskedLM, groups: Groups | None = None) -> BertForMaskedLM:
    """Return the small model: one layer per group, each the parameter average of its group."""
    big = list(model.bert.encoder.layer)
    groups = adjacent_pairs(len(big)) if groups is None else groups
    _check_groups(groups, len(big))
    small = clone_model(model)  # embeddings and head copied exactly, decoder still tied
    layers = []
    for group in groups:
        layer = copy_layer(small.bert.encoder.layer[group[0]], small.config)
        sources = [dict(big[j].named_parameters()) for j in group]
        with torch.no_grad():
            for name, param in layer.named_parameters():
                # Stack then mean: the same rounding for every parameter and group size.
                param.copy_(torch.stack([s[name] for s in sources]).mean(dim=0))
        layers.append(layer)
    return set_encoder_layers(small, layers)


def decoalesce_depth(
    small: BertForMaskedLM, num_layers: int, groups: Groups | None = None
) -> BertForMaskedLM:
    """Return a `num_layers`-deep model whose layer j copies the small layer whose group holds j."""
    groups = adjacent_pairs(num_layers) if groups is None else groups
    _check_groups(groups, num_layers)
    if len(groups) != small.config.num_hidden_layers:
        raise ValueError(
            f"{len(groups)} groups for a small model of {small.config.num_hidden_layers} layers"
        )
    owner = {j: i for i, group in enumerate(groups) for j in group}
    large = clone_model(small)
    source = list(large.bert.encoder.layer)
    layers = [copy_layer(source[owner[j]], large.config) for j in range(num_layers)]
    return set_encoder_layers(large, layers)


def interpolate(
    large_before: BertForMaskedLM, decoalesced: BertForMaskedLM, alpha: float = DEFAULT_ALPHA
) -> BertForMaskedLM:
    """Return (1 - alpha) * large_before + alpha * decoalesced, parameter by parameter.

    `torch.lerp` is exact at both ends (alpha 0 gives `large_before`, alpha 1 gives
    `decoalesced`, bitwise). Parameters are matched by name; tied ones are visited once.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    new = clone_model(large_before)
    other = dict(decoalesced.named_parameters())
    mine = dict(new.named_parameters())
    if mine.keys() != other.keys():
        raise ValueError("interpolate needs two models of the same architecture")
    with torch.no_grad():
        for name, param in mine.items():
            param.copy_(torch.lerp(param, other[name], alpha))
    return new


def coalesce_width(model: BertForMaskedLM) -> BertForMaskedLM:
    """Not implemented: see the module docstring (width maps change `hidden_size`)."""
    raise NotImplementedError(
        "width coalescing is not implemented: the V-cycle here is depth-only, because "
        "merging heads/neurons changes hidden_size, which the shared loop, the tied "
        "decoder and the activation cache keep fixed within a run"
    )


def run(ctx: MethodContext) -> BertForMaskedLM:
    """One V-cycle: train the large model briefly, coalesce to half depth, train the small
    model (at `vcycle_small_lr_multiplier` x the learning rate), de-coalesce, interpolate with
    the large model (alpha), and train the large model to the end of the budget."""
    m = ctx.method
    depth = ctx.args.model.num_layers
    large = ctx.new_model(depth)
    ctx.train("large", large, m.vcycle_large_fraction)
    small = coalesce_depth(large)
    ctx.train("small", small, m.vcycle_small_fraction, lr_multiplier=m.vcycle_small_lr_multiplier)
    model = interpolate(large, decoalesce_depth(small, depth), alpha=m.vcycle_alpha)
    ctx.train("large-after", model, 1.0)
    return model
