"""The model split, freezing and growth (docs/design.md invariants 1, 2 and 7 at the module level)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import BertForMaskedLM

from cached_mslt.config import ModelArgs
from cached_mslt.models.bert import (
    TopModel,
    bottom_forward,
    build_model,
    check_tied,
    freeze_bottom,
    grow,
    mlm_head_loss,
    top_forward,
)

VOCAB = 200


def small_model(layers=4, attn="sdpa", seed=0):
    args = ModelArgs(
        hidden_size=32, num_attention_heads=2, intermediate_size=64, attn_implementation=attn
    )
    return build_model(args, VOCAB, layers, seed=seed)


def batch(b=3, t=16, padded=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if padded:
        mask[0, t // 2 :] = 0
        mask[1, t - 3 :] = 0
    labels = torch.full((b, t), -100)
    chosen = (torch.rand(b, t, generator=g) < 0.3) & mask.bool()
    chosen[:, 1] = True
    labels[chosen] = ids[chosen]
    return ids, mask, labels


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("frozen", [0, 1, 3])
def test_split_forward_is_bitwise_the_whole_model(attn, padded, frozen):
    model = small_model(attn=attn).eval()
    ids, mask, _ = batch(padded=padded)
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask).logits
        split = top_forward(model, bottom_forward(model, ids, mask, frozen), mask, frozen)
    assert torch.equal(whole, split)


def test_sparse_head_loss_equals_dense_hf_loss():
    model = small_model().eval()
    ids, mask, labels = batch(b=4, t=32, padded=True)
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        hidden = bottom_forward(model, ids, mask, 4)
        sparse, n = mlm_head_loss(model, hidden, labels)
    assert n == int((labels != -100).sum())
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=0)


def test_freeze_bottom_is_real_and_keeps_tied_decoder_frozen():
    model = small_model()
    trainable = freeze_bottom(model, 2)
    ids = {id(p) for p in trainable}
    for p in [*model.bert.embeddings.parameters(), *model.bert.encoder.layer[:2].parameters()]:
        assert not p.requires_grad and id(p) not in ids
    assert not model.bert.embeddings.training and not model.bert.encoder.layer[1].training
    assert model.bert.encoder.layer[2].training
    # The decoder weight is the word embedding: frozen with it. Bias and transform train.
    assert not model.cls.predictions.decoder.weight.requires_grad
    assert id(model.cls.predictions.bias) in ids
    assert all(id(p) in ids for p in model.cls.predictions.transform.parameters())


def test_top_model_gradients_touch_only_the_top():
    model = small_model()
    freeze_bottom(model, 2)
    ids, mask, labels = batch()
    with torch.no_grad():
        hidden = bottom_forward(model, ids, mask, 2)
    loss, _ = TopModel(model, 2)(labels, mask, hidden_states=hidden)
    loss.backward()
    assert all(p.grad is None for p in model.bert.encoder.layer[:2].parameters())
    assert all(p.grad is not None for p in model.bert.encoder.layer[2:].parameters())


def test_grow_copies_the_top_layers_in_order():
    model = small_model(layers=3)
    grow(model, 6, init="copy")
    layers = model.bert.encoder.layer
    assert model.config.num_hidden_layers == 6 and len(layers) == 6
    for new, old in zip(layers[3:], layers[:3]):
        for (n1, p1), (_, p2) in zip(new.named_parameters(), old.named_parameters()):
            assert torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr(), n1
    assert [lay.attention.self.layer_idx for lay in layers] == list(range(6))
    assert all(lay.attention.self.config is model.config for lay in layers)


def test_grow_fresh_reinitialises_new_layers():
    model = small_model(layers=2)
    grow(model, 3, init="fresh")
    w_new = model.bert.encoder.layer[2].attention.self.query.weight
    assert not torch.equal(w_new, model.bert.encoder.layer[1].attention.self.query.weight)


def test_grow_identity_keeps_the_function_of_the_smaller_model():
    # Exact when the top LayerNorm's affine is uniform across features (as at init);
    # a trained, non-uniform affine makes it approximate (docs/design.md, growth).
    model = small_model(layers=3).eval()
    ids, mask, _ = batch(padded=True)
    before = model(input_ids=ids, attention_mask=mask).logits
    grow(model, 6, init="identity")
    after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(before, after, atol=1e-4)
    top = model.bert.encoder.layer[5]
    assert torch.count_nonzero(top.output.dense.weight) == 0
    assert torch.count_nonzero(top.attention.self.query.weight) > 0  # copied, not zero


def test_saved_model_reloads_bitwise_and_stays_tied(tmp_path):
    model = small_model(layers=3)
    grow(model, 5)
    freeze_bottom(model, 3)
    model.save_pretrained(tmp_path)
    again = BertForMaskedLM.from_pretrained(tmp_path).eval()
    model.eval()
    check_tied(again)
    ids, mask, _ = batch(padded=True)
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, attention_mask=mask).logits,
            again(input_ids=ids, attention_mask=mask).logits,
        )


def test_mlm_head_loss_matches_cross_entropy_on_selected_rows():
    model = small_model().eval()
    ids, mask, labels = batch()
    with torch.no_grad():
        hidden = bottom_forward(model, ids, mask, 4)
        loss, _ = mlm_head_loss(model, hidden, labels)
        sel = labels != -100
        expected = F.cross_entropy(model.cls(hidden)[sel], labels[sel])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
