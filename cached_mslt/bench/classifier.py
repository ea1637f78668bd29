"""Fine-tuning's classifier step with the [CLS]-only last layer against the whole last
layer (docs/evaluation.md, fine-tuning from the cache): full fine-tuning and the tops
issue 30 measured, at all-MiniLM-L6-v2's shape (random weights: the cost is the shape's).
Run: `python pipelines/bench.py --variants classifier`.
"""

from __future__ import annotations

import copy
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

from cached_mslt.bench.interleave import interleaved_rounds
from cached_mslt.evaluation import ClassifierTop, freeze_to

# (frozen layers, tokens a row): full fine-tuning and sentiment's K = 3 top at the
# sentiment snippets' padded length, bbc's K = 4 top at its 128 tokens.
CASES = ((0, 40), (3, 40), (4, 128))
BATCH = 32


def minilm_shape() -> BertConfig:
    """all-MiniLM-L6-v2's encoder: 6 layers, hidden 384, 12 heads, 30,522 tokens."""
    return BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
        intermediate_size=1536, num_labels=2,
    )  # fmt: skip


def _step(top: ClassifierTop, batch: dict[str, torch.Tensor]):
    optimizer = torch.optim.AdamW([p for p in top.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        top(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def classifier_benchmarks(repeats: int = 5) -> list[dict]:
    """Tokens/s of a training step (forward, backward, AdamW) of each case's top with the
    whole last layer and with position 0's alone, and their ratio, in interleaved rounds
    of process CPU time. Half the rows are padded to half the length."""
    torch.manual_seed(0)
    base = BertForSequenceClassification(minilm_shape())
    out = []
    for frozen, length in CASES:
        model = copy.deepcopy(base)
        freeze_to(model, frozen)
        mask = torch.ones(BATCH, length, dtype=torch.long)
        mask[::2, length // 2 :] = 0
        batch = {"labels": torch.randint(0, 2, (BATCH,)), "attention_mask": mask}
        if frozen:
            batch["hidden_states"] = torch.randn(BATCH, length, model.config.hidden_size)
        else:
            batch["input_ids"] = torch.randint(1000, 2000, (BATCH, length))
        steps = {
            name: _step(ClassifierTop(model, frozen, first_only).train(), batch)
            for name, first_only in (("whole", False), ("first", True))
        }
        # CPU time: a neighbour on the shared cores does not count against either side.
        rounds = interleaved_rounds(
            steps, [("whole", "first")], window=repeats, clock=time.process_time
        )
        tag = {"frozen": frozen, "trained": 6 - frozen, "tokens_per_row": length, "batch": BATCH}
        tokens = BATCH * length
        out += [
            {"name": f"classifier_step_{k}_last_layer_tokens_per_s", "unit": "tokens/s", **tag}
            | {"value": tokens / rounds.median_s(k)}
            for k in steps
        ]
        out.append(
            {"name": "classifier_step_first_position_speedup", "unit": "x", **tag}
            | rounds.ratio("whole", "first")
        )
    return out
