"""The comparison methods' structural operators (issue 6): stacking, PLD, share/unshare, V-cycle."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
)

from cached_mslt.methods.multilevel import (
    coalesce_depth,
    coalesce_width,
    decoalesce_depth,
    interpolate,
)
from cached_mslt.methods.pld import keep_prob, layer_keep_probs
from cached_mslt.methods.share_unshare import share_layers, unshare_layers, unshare_optimizer_state
from cached_mslt.methods.stacking import stack_double
from cached_mslt.models import (
    PreLNBertConfig,
    PreLNBertForMaskedLM,
    PreLNBertForSequenceClassification,
)

SIZES = dict(
    vocab_size=120,
    hidden_size=32,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=32,
)


def bert(num_layers: int, seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(num_hidden_layers=num_layers, **SIZES))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, SIZES["vocab_size"], (2, 16), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, ::4] = ids[:, ::4]
    return ids, labels


def layer_state(model: torch.nn.Module, i: int) -> dict[str, torch.Tensor]:
    return dict(model.bert.encoder.layer[i].named_parameters())


def assert_same_values(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def outside_encoder(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".encoder.layer." not in k}


# --- progressive stacking ---------------------------------------------------------------


def test_stack_double_copies_layers_exactly() -> None:
    model = bert(2)
    doubled = stack_double(model)
    assert len(model.bert.encoder.layer) == 2  # the input is left alone
    assert doubled.config.num_hidden_layers == len(doubled.bert.encoder.layer) == 4
    for layer in range(2):
        top, bottom = layer_state(doubled, layer + 2), layer_state(doubled, layer)
        assert_same_values(top, bottom)
        assert_same_values(bottom, layer_state(model, layer))
        assert all(top[k].data_ptr() != bottom[k].data_ptr() for k in top)
    for i, layer in enumerate(doubled.bert.encoder.layer):
        assert layer.attention.self.layer_idx == i
        # one shared config object (docs/library-facts.md, growth)
        assert layer.attention.self.config is doubled.config
    assert_same_values(outside_encoder(doubled), outside_encoder(model))
    emb = doubled.bert.embeddings.word_embeddings.weight
    assert doubled.cls.predictions.decoder.weight is emb

    doubled.eval()
    ids, _ = batch()
    with torch.no_grad():
        first, second = doubled(ids).logits, doubled(ids).logits
    assert torch.isfinite(first).all() and torch.equal(first, second)


# --- progressive layer dropping ---------------------------------------------------------


def test_pld_keep_probabilities_follow_both_formulas() -> None:
    assert keep_prob(0) == 1.0
    for t in (10, 500, 5000):
        assert keep_prob(t) == pytest.approx(0.5 * math.exp(-0.001 * t) + 0.5, rel=1e-12)
    assert keep_prob(1e6) == pytest.approx(0.5)
    assert keep_prob(100, theta_bar=0.2, gamma=0.01) == pytest.approx(0.8 * math.exp(-1) + 0.2)
    assert layer_keep_probs(0.5, 4) == pytest.approx([1.0, 0.875, 0.75, 0.625])
    assert layer_keep_probs(1.0, 6) == [1.0] * 6


def pld_model(**overrides: float) -> PreLNBertForMaskedLM:
    torch.manual_seed(0)
    return PreLNBertForMaskedLM(PreLNBertConfig(num_hidden_layers=4, **SIZES, **overrides))


def count_calls(model: PreLNBertForMaskedLM) -> list[int]:
    calls = [0] * len(model.bert.encoder.layer)
    for i, layer in enumerate(model.bert.encoder.layer):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_pld_dropped_layer_is_skipped_and_gets_no_gradient() -> None:
    model = pld_model().train()
    model.set_theta(0.2)  # p = 1, 0.8, 0.6, 0.4
    calls = count_calls(model)
    ids, labels = batch()
    for _ in range(20):  # seeded: the first draws already drop a layer; bounded anyway
        calls[:] = [0] * len(calls)
        model.zero_grad(set_to_none=True)
        model(ids, labels=labels).loss.backward()
        if 0 in calls:
            break
    assert 0 in calls and calls[0] == 1, calls
    assert model.last_layers_run == sum(calls)
    for i, layer in enumerate(model.bert.encoder.layer):
        grads = [p.grad for p in layer.parameters()]
        if calls[i]:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), i
        else:
            assert all(g is None for g in grads), i


def test_pld_eval_runs_every_layer_unscaled() -> None:
    model = pld_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids, _ = batch()
    model.set_theta(1.0)
    model.train()
    with torch.no_grad():
        reference = model(ids).logits  # theta 1: every layer kept, nothing rescaled
    model.set_theta(0.1)
    model.eval()
    calls = count_calls(model)
    with torch.no_grad():
        logits = model(ids).logits
    assert calls == [1, 1, 1, 1]
    assert torch.equal(logits, reference)


def test_pld_save_and_from_pretrained_round_trip(tmp_path) -> None:
    model = pld_model().eval()
    ids, _ = batch()
    model.save_pretrained(tmp_path)
    for loaded in (
        PreLNBertForMaskedLM.from_pretrained(tmp_path),
        AutoModelForMaskedLM.from_pretrained(tmp_path),
    ):
        assert type(loaded) is PreLNBertForMaskedLM
        assert_same_values(loaded.state_dict(), model.state_dict())
        emb = loaded.bert.embeddings.word_embeddings.weight
        assert loaded.cls.predictions.decoder.weight is emb
        with torch.no_grad():
            assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert type(clf) is PreLNBertForSequenceClassification


# --- share, then unshare ----------------------------------------------------------------


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # each shared/tied tensor once


def test_share_layers_keeps_one_parameter_set() -> None:
    shared = share_layers(bert(3))
    layers = list(shared.bert.encoder.layer)
    assert len(layers) == shared.config.num_hidden_layers == 3
    assert all(layer is layers[0] for layer in layers)
    assert n_params(shared) == n_params(bert(1))


def test_unshare_layers_gives_equal_independent_copies() -> None:
    shared = share_layers(bert(3))
    ids, labels = batch()
    opt = torch.optim.AdamW(shared.parameters(), lr=1e-3)
    shared(ids, labels=labels).loss.backward()
    opt.step()

    untied = unshare_layers(shared)
    block = dict(shared.bert.encoder.layer[0].named_parameters())
    assert n_params(untied) == n_params(bert(3))
    ptrs = set()
    for i in range(3):
        state = layer_state(untied, i)
        assert_same_values(state, block)
        ptrs |= {p.data_ptr() for p in state.values()}
    assert len(ptrs) == 3 * len(block)  # distinct storage, also from the shared block's
    assert not ptrs & {p.data_ptr() for p in block.values()}
    shared.eval(), untied.eval()
    with torch.no_grad():
        assert torch.equal(untied(ids).logits, shared(ids).logits)
        untied.bert.encoder.layer[0].intermediate.dense.weight.add_(1.0)
    for i in (1, 2):
        assert_same_values(layer_state(untied, i), block)

    new_opt = torch.optim.AdamW(untied.parameters(), lr=1e-3)
    assert unshare_optimizer_state(opt, shared, new_opt, untied) == len(list(untied.parameters()))
    source = opt.state[block["output.dense.weight"]]["exp_avg"]
    copies = [new_opt.state[untied.bert.encoder.layer[i].output.dense.weight] for i in range(3)]
    assert all(torch.equal(c["exp_avg"], source) for c in copies)
    assert len({c["exp_avg"].data_ptr() for c in copies} | {source.data_ptr()}) == 4


# --- multi-level V-cycle ----------------------------------------------------------------


def test_coalesce_then_decoalesce_gives_pair_averages() -> None:
    large = bert(4)
    small = coalesce_depth(large)
    assert small.config.num_hidden_layers == len(small.bert.encoder.layer) == 2
    back = decoalesce_depth(small, num_layers=4)
    assert back.config.num_hidden_layers == 4
    for j in range(4):
        a, b = layer_state(large, 2 * (j // 2)), layer_state(large, 2 * (j // 2) + 1)
        assert_same_values(layer_state(back, j), {k: (a[k] + b[k]) / 2 for k in a})
    for model in (small, back):
        assert_same_values(outside_encoder(model), outside_encoder(large))
        assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    # A depth-paired model (equal pairs) coalesces back to exactly the small model.
    assert_same_values(coalesce_depth(back).state_dict(), small.state_dict())


def test_interpolation_endpoints() -> None:
    large = bert(4, seed=0)
    decoalesced = decoalesce_depth(coalesce_depth(bert(4, seed=1)), num_layers=4)
    assert_same_values(interpolate(large, decoalesced, alpha=0.0).state_dict(), large.state_dict())
    assert_same_values(
        interpolate(large, decoalesced, alpha=1.0).state_dict(), decoalesced.state_dict()
    )
    mid = dict(interpolate(large, decoalesced).named_parameters())  # alpha 0.5 by default
    other = dict(decoalesced.named_parameters())
    for name, param in large.named_parameters():
        torch.testing.assert_close(mid[name], (param + other[name]) / 2)


def test_width_coalescing_is_refused_clearly() -> None:
    with pytest.raises(NotImplementedError, match="width"):
        coalesce_width(bert(2))
