"""The MLM loss over the vocabulary, with a backward that makes fewer passes over it.

`F.cross_entropy` over [masked tokens, vocabulary] logits costs, besides the decoder
matmuls, a log-softmax forward, and in the backward a zero-filled gradient for the NLL
(one full write), a scatter, and a log-softmax backward (two full reads, one write). On
a CPU these passes are a large share of a step: 27% of tiny's cached top step at batch 32
(vocabulary 8,192, 40% masked; docs/benchmarks.md, the MLM head). Here the backward turns
the saved log-probabilities into the gradient in place, `(softmax - one_hot) * g / n`:
one exponential pass and one scaling pass, no fill.

Values: the loss is the mean over labelled rows as in `F.cross_entropy(..., ignore_index
= -100)` (NaN when none is labelled, as there); loss and gradient agree with it to
float32 rounding, not bitwise (tests/test_mlm_loss.py).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _MaskedLMCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        labelled = target != IGNORE_INDEX
        index = torch.where(labelled, target, 0).unsqueeze(1)
        weight = labelled.to(log_probs.dtype)
        count = weight.sum()
        loss = -(log_probs.gather(1, index).squeeze(1) * weight).sum() / count
        ctx.save_for_backward(log_probs, index, weight, count)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # The saved log-probabilities become the gradient in place; autograd's version
        # check refuses a second backward through this graph (retain_graph) instead of
        # reading the overwritten values.
        log_probs, index, weight, count = ctx.saved_tensors
        g = log_probs.exp_()  # softmax
        g.scatter_add_(1, index, -weight.unsqueeze(1))  # minus the one-hot target
        g.mul_((weight * (grad / count)).unsqueeze(1))  # unlabelled rows get no gradient
        return g.to(ctx.logits_dtype), None


def masked_lm_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `logits` [rows, vocab] against `target` [rows], ignoring
    rows labelled -100 (the padding of a fixed-shape gather), computed in float32."""
    return _MaskedLMCrossEntropy.apply(logits, target)
