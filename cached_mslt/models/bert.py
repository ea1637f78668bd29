"""BertForMaskedLM split into a frozen bottom and a trainable top, plus growth and freezing.

The model is always a plain `transformers.BertForMaskedLM`; the split is a way of
running it, not a different architecture. `bottom = embeddings + layer[:F]`,
`top = layer[F:] + MLM head`. Running the two halves with the mask that
`create_bidirectional_mask` builds gives logits bitwise equal to `model(...)`
(measured in docs/library-facts.md), which is what lets the top train from cached
hidden states.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, PretrainedConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import BertLayer, eager_attention_forward

from cached_mslt.config import GROWTH_INITS, ModelArgs
from cached_mslt.models.mlm_loss import IGNORE_INDEX, masked_lm_cross_entropy
from storage import fingerprint_module


def bert_config(args: ModelArgs, vocab_size: int, num_layers: int) -> BertConfig:
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=args.max_position_embeddings,
        hidden_dropout_prob=args.dropout,
        attention_probs_dropout_prob=args.dropout,
        tie_word_embeddings=True,
    )
    config._attn_implementation = args.attn_implementation
    return config


def build_model(
    args: ModelArgs, vocab_size: int, num_layers: int, seed: int = 0
) -> BertForMaskedLM:
    torch.manual_seed(seed)
    model = BertForMaskedLM(bert_config(args, vocab_size, num_layers))
    model.set_attn_implementation(args.attn_implementation)
    return model


def layer_mask(model: BertForMaskedLM, hidden: torch.Tensor, attention_mask: torch.Tensor | None):
    """The mask every encoder layer takes, in the form the attention implementation wants
    (bool under sdpa, additive under eager, None when nothing is padded)."""
    return create_bidirectional_mask(
        config=model.config, inputs_embeds=hidden, attention_mask=attention_mask
    )


def run_layers(
    model: BertForMaskedLM,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    start: int,
    stop: int | None = None,
) -> torch.Tensor:
    """Encoder layers [start, stop) on hidden states."""
    mask = layer_mask(model, hidden, attention_mask)
    for layer in model.bert.encoder.layer[start:stop]:
        hidden = layer(hidden, mask)
    return hidden


def first_position_layer(
    layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """One encoder layer's output at position 0 alone, `[batch, 1, hidden]`: what a
    classifier that reads [CLS] needs from the last layer. The keys and values of every
    position are computed, but the query, the attention output and the feed-forward only
    for position 0: about a sixth of the layer's FLOPs (keys and values are 2 of its 12
    d^2 per token). Equal to `layer(hidden, mask)[:, :1]` up to float rounding (other
    matmul shapes), and that is what a layer other than transformers' `BertLayer` runs.
    `mask` is `layer_mask`'s, for all positions. Under dropout the draws differ from the
    whole layer's (fewer elements), not their distribution."""
    if type(layer) is not BertLayer or layer.is_decoder:
        return layer(hidden, mask)[:, :1]
    attention = layer.attention.self
    first = hidden[:, :1]
    heads = (hidden.shape[0], -1, attention.num_attention_heads, attention.attention_head_size)
    query = attention.query(first).view(heads).transpose(1, 2)
    key = attention.key(hidden).view(heads).transpose(1, 2)
    value = attention.value(hidden).view(heads).transpose(1, 2)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(
        attention.config._attn_implementation, eager_attention_forward
    )
    context, _ = attend(
        attention,
        query,
        key,
        value,
        None if mask is None else mask[:, :, :1],  # position 0's row of [batch, 1, q, k]
        dropout=attention.dropout.p if attention.training else 0.0,
        scaling=attention.scaling,
    )
    attended = layer.attention.output(context.reshape(first.shape), first)
    return layer.feed_forward_chunk(attended)


def bottom_forward(
    model: BertForMaskedLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    frozen: int,
) -> torch.Tensor:
    """Embeddings + the first `frozen` layers: what the activation store holds."""
    hidden = model.bert.embeddings(input_ids=input_ids)
    return run_layers(model, hidden, attention_mask, 0, frozen)


def mlm_head_loss(
    model: BertForMaskedLM,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    targets: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int | None]:
    """MLM loss on masked positions only: gather them before the head, so the 30k-way
    decoder runs on ~15% of the tokens (3.3x faster steps on tiny, docs/library-facts.md).

    `targets` = (flat positions, their labels) from `masked_targets`, computed on the host:
    the gather then has a shape the host knows, where a boolean index makes a GPU wait
    for the count. Returns the mean loss and the number of masked tokens it averages over
    (None with `targets`: the caller counted them on the host).
    """
    if targets is None:
        selected = labels != IGNORE_INDEX
        picked, target = hidden[selected], labels[selected]
        count: int | None = int(target.numel())
    else:
        positions, target = targets
        picked, count = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions), None
    # Padding entries carry IGNORE_INDEX: the mean is over the real ones only.
    return masked_lm_cross_entropy(model.cls(picked), target), count


def masked_targets(labels: torch.Tensor, per_row: int | None = None) -> dict[str, torch.Tensor]:
    """On the host, before the copy: the flat positions of the labelled tokens of `labels`
    [rows, T] (row-major, the order a boolean index takes) and their labels.

    With `per_row`, padded to `rows * per_row` entries (position 0, label IGNORE_INDEX) when
    the batch fits, so every full batch has one shape (a compiled top then never
    recompiles). Unpadded, the loss and gradients are bitwise those of the boolean gather;
    padded, the loss still is, but the weight gradients' matmuls run over more rows and
    differ in the last bits (docs/library-facts.md).
    """
    flat = labels.reshape(-1)
    positions = torch.nonzero(flat != IGNORE_INDEX).squeeze(1)
    target = flat.index_select(0, positions)
    pad = 0 if per_row is None else labels.shape[0] * per_row - len(positions)
    if pad > 0:
        positions = torch.cat([positions, positions.new_zeros(pad)])
        target = torch.cat([target, target.new_full((pad,), IGNORE_INDEX)])
    return {"masked_positions": positions, "masked_labels": target}


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[rows, T, H] -> [rows, H]: mean over real tokens, in float32."""
    mask = attention_mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def top_forward(
    model: BertForMaskedLM,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    start: int,
) -> torch.Tensor:
    """Dense logits from hidden states after layer `start`: reproduces `model(...).logits`."""
    return model.cls(run_layers(model, hidden_states, attention_mask, start))


class TopModel(nn.Module):
    """The trainable part of a stage as one module, so `accelerator.prepare` wraps exactly
    what trains (DDP all-reduces only these gradients; the frozen bottom never enters DDP).

    `frozen == 0` means nothing is frozen: the module starts from token ids
    (stage 1, the full-model baseline, a joint phase).
    """

    def __init__(self, model: BertForMaskedLM, frozen: int):
        super().__init__()
        self.model = model
        self.frozen = frozen

    def forward(
        self,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        masked_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int | None]:
        if self.frozen == 0:
            hidden_states = self.model.bert.embeddings(input_ids=input_ids)
        elif hidden_states is None:
            raise ValueError(f"a top above {self.frozen} frozen layers needs hidden_states")
        hidden = run_layers(self.model, hidden_states, attention_mask, self.frozen)
        targets = None if masked_positions is None else (masked_positions, masked_labels)
        return mlm_head_loss(self.model, hidden, labels, targets)


def set_dropout(model: nn.Module, rate: float) -> None:
    """Every dropout of the model (hidden, attention, the head's) at `rate`, and the config
    saying so, so a checkpoint saved after it records what its last stage trained with.
    A frozen module in eval mode drops nothing whatever its rate."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = rate
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = rate


def frozen_modules(model: BertForMaskedLM, frozen: int) -> list[nn.Module]:
    """What `frozen` means: the embeddings (and with them the tied decoder weight) and the
    first `frozen` encoder layers. Nothing is frozen when `frozen == 0`."""
    if frozen == 0:
        return []
    return [model.bert.embeddings, *model.bert.encoder.layer[:frozen]]


def freeze_bottom(model: BertForMaskedLM, frozen: int) -> list[nn.Parameter]:
    """Freeze the bottom for real (requires_grad off, eval mode so dropout is off) and return
    the parameters that still train, for the optimizer: frozen ones are never handed to it.

    The tied decoder weight is the word-embedding matrix, so it freezes with the
    embeddings; the head transform and the decoder bias keep training. Freezing the tied
    weight is also what makes cached training exact: a trainable embedding would get
    gradient through the input path too, which a cache cannot reproduce (docs/library-facts.md).
    """
    if not 0 <= frozen <= model.config.num_hidden_layers:
        raise ValueError(
            f"cannot freeze {frozen} layers of a {model.config.num_hidden_layers}-layer model"
        )
    model.requires_grad_(True)
    model.train()
    for module in frozen_modules(model, frozen):
        module.requires_grad_(False)
        module.eval()
    return [p for p in model.parameters() if p.requires_grad]


def bottom_fingerprint(model: nn.Module, frozen: int) -> str:
    """What a store and a stage manifest record of the frozen bottom: a hash of the
    embeddings and the first `frozen` layers (docs/design.md invariant 5)."""
    return fingerprint_module(nn.ModuleList(frozen_modules(model, frozen)))


def model_fingerprint(model: nn.Module) -> str:
    """What a stage manifest records of the whole model it saved (every parameter and
    buffer, head included): the next stage refuses weights that do not hash to it."""
    return fingerprint_module(model)


def decay_param_groups(
    model: nn.Module, weight_decay: float, params: list[nn.Parameter] | None = None
) -> list[dict]:
    """AdamW groups by BERT's convention: no weight decay on biases and LayerNorm weights.
    `params` (default: every parameter of `model`) keeps its order within each group."""
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = [], []
    for p in model.parameters() if params is None else params:
        name = names.get(id(p), "")
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# --- layer surgery: growth here, the structural operators of methods/ on the same helpers ---


def copy_layer(layer: nn.Module, config: PretrainedConfig) -> nn.Module:
    """Deep copy of one encoder layer that still points at the model's `config` object: a
    plain deepcopy gives the copy its own config, which a later `set_attn_implementation`
    misses (docs/library-facts.md, "Growth")."""
    return copy.deepcopy(layer, memo={id(config): config})


def set_encoder_layers(model: nn.Module, layers: Sequence[nn.Module]) -> nn.Module:
    """Install `layers` as the encoder, in place, and keep the config and layer indices in step."""
    model.bert.encoder.layer = nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)
    # layer_idx only addresses a KV cache (decoder use), but keep it truthful. A block
    # shared by several positions keeps the index of its first position.
    for i in reversed(range(len(layers))):
        layers[i].attention.self.layer_idx = i
    return model


def clone_model(model: nn.Module) -> nn.Module:
    """An independent copy. One deepcopy call shares its memo across the whole model, so
    the copy keeps the original's structure: one config object, the decoder tied to the
    word embeddings, a shared block still shared."""
    return copy.deepcopy(model)


@torch.no_grad()
def _start_as_identity(layer: nn.Module, top_norm: nn.LayerNorm) -> None:
    for projection in (layer.attention.output.dense, layer.output.dense):
        projection.weight.zero_()
        projection.bias.zero_()
    for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm):
        norm.weight.copy_(top_norm.weight)
        norm.bias.copy_(top_norm.bias)


def grow(model: BertForMaskedLM, num_layers: int, init: str = "copy") -> BertForMaskedLM:
    """Add encoder layers on top until the model has `num_layers`.

    `copy`: new layer j copies layer j - added of the grown stack, i.e. the current top
    `added` layers are duplicated in order (progressive stacking's initialisation).
    `fresh`: new layers get the model's standard initialisation.
    `identity`: as `copy`, but each new layer starts as (nearly) the identity, so the
    grown model computes what the previous one did: the two residual branches' output
    projections are zero and both LayerNorms take the affine of the current top layer's
    output LayerNorm. A post-LN layer then maps its input x = g * n + b (n normalised)
    to g * norm(x) + b, which is x exactly when g and b are uniform across features and
    close to x otherwise (docs/design.md, growth).
    """
    layers = model.bert.encoder.layer
    current = len(layers)
    added = num_layers - current
    if added <= 0:
        raise ValueError(f"grow to {num_layers} layers: the model already has {current}")
    if init not in GROWTH_INITS:
        raise ValueError(f"growth init {init!r}; choose one of {', '.join(GROWTH_INITS)}")
    top_norm = layers[current - 1].output.LayerNorm
    for idx in range(current, num_layers):
        source = layers[idx - added if current >= added else (idx - current) % current]
        new = copy_layer(source, model.config)
        if init == "fresh":
            new.apply(model._init_weights)
        elif init == "identity":
            _start_as_identity(new, top_norm)
        new.attention.self.layer_idx = idx
        layers.append(new)
    model.config.num_hidden_layers = num_layers
    return model


def check_tied(model: BertForMaskedLM) -> None:
    decoder = model.cls.predictions.decoder.weight
    embedding = model.bert.embeddings.word_embeddings.weight
    if decoder.data_ptr() != embedding.data_ptr():
        raise AssertionError("decoder weight is no longer tied to the word embeddings")
