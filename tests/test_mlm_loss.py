"""The MLM loss with its in-place backward computes what `F.cross_entropy` computes
(ignore_index -100, mean over labelled rows): loss and gradient to float32 rounding."""

import pytest
import torch
import torch.nn.functional as F

from cached_mslt.models.mlm_loss import IGNORE_INDEX, masked_lm_cross_entropy


def _case(rows=37, vocab=501, ignored=(3, 8, 36), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(rows, vocab, generator=g)).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[list(ignored)] = IGNORE_INDEX
    return logits, target


def _loss_and_grad(fn, logits, target, scale=1.0):
    logits = logits.detach().clone().requires_grad_()
    loss = fn(logits, target)
    (scale * loss).backward()
    return loss.detach(), logits.grad


def test_mlm_loss_and_gradient_equal_cross_entropy_with_ignored_rows():
    logits, target = _case()
    ours = _loss_and_grad(masked_lm_cross_entropy, logits, target, scale=3.0)
    ref = _loss_and_grad(lambda x, t: F.cross_entropy(x, t), logits, target, scale=3.0)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-8)
    assert ours[1][[3, 8, 36]].abs().max() == 0  # ignored rows get no gradient


def test_mlm_loss_of_bf16_logits_is_computed_in_float32():
    logits, target = _case(dtype=torch.bfloat16)
    loss, grad = _loss_and_grad(masked_lm_cross_entropy, logits, target)
    ref_loss, ref_grad = _loss_and_grad(lambda x, t: F.cross_entropy(x.float(), t), logits, target)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad)


def test_mlm_loss_with_nothing_labelled_is_nan_as_cross_entropy():
    logits, target = _case(rows=4, ignored=(0, 1, 2, 3))
    assert masked_lm_cross_entropy(logits, target).isnan()
    assert F.cross_entropy(logits, target).isnan()


def test_mlm_loss_refuses_a_second_backward_instead_of_reading_overwritten_values():
    logits, target = _case()
    loss = masked_lm_cross_entropy(logits, target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
