"""Training FLOPs counted from shapes, the same way for every method.

Forward, per token, one encoder layer (hidden H, intermediate I, sequence length T):

    2 * (4 H^2 + 2 H I)   the matmuls: Q, K, V, output projection, FFN in and out
                          (2 FLOPs per multiply-add)
  + 4 T H                 attention scores Q K^T and context P V (T*H multiply-adds each)

MLM head, per masked token (the head runs on masked positions only):

    2 H^2 + 2 H V         transform dense + decoder (V = vocab size)

Embedding lookups, biases, LayerNorms, softmax and activations are left out (lower
order: O(H) per token against O(H^2)), so the count sits a few percent under a profiler's.

A training step costs, per token, forward 1x and backward 2x (one matmul for the input
gradient, one for the weight gradient) for each layer that trains; 1x for a frozen layer
run live (forward only, nothing trainable below it); 0 for layers whose output is read
from the activation cache, and 0 for layers PLD drops. The head trains in every method,
but when the decoder weight is tied to frozen word embeddings (MSLT after stage 1) its
weight gradient is never computed: the decoder's backward is then 1x, not 2x.
"""

from __future__ import annotations

from transformers import PretrainedConfig


def layer_forward_flops(config: PretrainedConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one encoder layer at sequence length `seq_len`."""
    h, i = config.hidden_size, config.intermediate_size
    return 2.0 * (4 * h * h + 2 * h * i) + 4.0 * seq_len * h


def head_forward_flops(config: PretrainedConfig) -> float:
    """Forward FLOPs of the MLM head per masked token: transform dense + decoder."""
    h, v = config.hidden_size, config.vocab_size
    return 2.0 * h * h + 2.0 * h * v


def step_flops(
    config: PretrainedConfig,
    *,
    tokens: int,
    masked_tokens: int,
    trained_layers: int,
    frozen_live_layers: int,
    seq_len: int,
    head_trains: bool = True,
    decoder_weight_trains: bool | None = None,
) -> float:
    """FLOPs of one training step (forward + backward) over `tokens` tokens.

    `tokens` counts every position in the batch (padding included: it is computed),
    `masked_tokens` the positions with a label, `seq_len` the padded length each sequence
    attends over (required: `max_position_embeddings` is usually not it). Layers read from
    a cache or dropped by PLD are simply not counted in either layer number.
    `head_trains=False` counts the head forward only (evaluation, cache build).
    `decoder_weight_trains` defaults to `head_trains`; set it False when the tied word
    embeddings are frozen.
    """
    layer = layer_forward_flops(config, seq_len)
    encoder = tokens * layer * (3 * trained_layers + frozen_live_layers)
    if decoder_weight_trains is None:
        decoder_weight_trains = head_trains
    h = config.hidden_size
    transform, decoder = 2.0 * h * h, 2.0 * h * config.vocab_size
    head = transform + decoder  # forward
    if head_trains:
        head += 2 * transform + (2 if decoder_weight_trains else 1) * decoder
    return encoder + masked_tokens * head
