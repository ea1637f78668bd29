"""The shape-based FLOP counter against a hand count and against torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer, BertOnlyMLMHead

from cached_mslt.training.flops import head_forward_flops, layer_forward_flops, step_flops


def test_matches_hand_count_on_a_tiny_config() -> None:
    config = BertConfig(hidden_size=4, intermediate_size=8, vocab_size=10, num_attention_heads=1)
    # matmuls 2 * (4*4*4 + 2*4*8) = 256, attention 4 * T * H = 4 * 3 * 4 = 48
    assert layer_forward_flops(config, seq_len=3) == 304
    # transform 2 * 4*4 = 32, decoder 2 * 4*10 = 80
    assert head_forward_flops(config) == 112
    common = dict(tokens=6, masked_tokens=2, seq_len=3)
    # 6 tokens * 304 * (3 trained + 1 frozen live) + 2 masked * 112 * 3
    assert step_flops(config, trained_layers=1, frozen_live_layers=1, **common) == 7968
    # frozen tied decoder weight: head = 3 * 32 + 2 * 80 per masked token
    assert (
        step_flops(
            config, trained_layers=1, frozen_live_layers=1, decoder_weight_trains=False, **common
        )
        == 6 * 304 * 4 + 2 * 256
    )
    # cached layers and dropped layers are simply not counted; evaluation is forward only
    assert step_flops(config, trained_layers=0, frozen_live_layers=0, **common) == 2 * 112 * 3
    assert (
        step_flops(config, trained_layers=0, frozen_live_layers=2, head_trains=False, **common)
        == 6 * 304 * 2 + 2 * 112
    )


def measured(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def config_for_profiling() -> BertConfig:
    config = BertConfig(
        hidden_size=64, num_attention_heads=4, intermediate_size=256, vocab_size=500
    )
    # Eager attention: FlopCounterMode has no formula for sdpa's CPU kernel and would
    # report the attention matmuls as zero.
    config._attn_implementation = "eager"
    return config


def test_matches_flop_counter_mode_on_one_layer() -> None:
    config = config_for_profiling()
    torch.manual_seed(0)
    layer = BertLayer(config)
    x = torch.randn(2, 32, config.hidden_size, requires_grad=True)
    forward = measured(lambda: layer(x))
    assert forward == pytest.approx(64 * layer_forward_flops(config, seq_len=32), rel=0.05)
    # backward ~2x forward, so a trained layer costs ~3x
    train = measured(lambda: layer(x).sum().backward())
    assert train == pytest.approx(3 * forward, rel=0.05)


def test_head_matches_flop_counter_mode_on_masked_rows() -> None:
    config = config_for_profiling()
    head = BertOnlyMLMHead(config)
    masked = torch.randn(10, config.hidden_size)
    assert measured(lambda: head(masked)) == pytest.approx(
        10 * head_forward_flops(config), rel=0.05
    )
