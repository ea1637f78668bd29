"""Freed host memory is kept for the next step (cached_mslt/training/host_memory.py): once a few
steps have run, a step's large tensors (here a 65,536-word head's logits, 130 MB) come
from memory the previous step freed, without page faults; glibc's default unmaps them
and faults every page in again, every step."""

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from cached_mslt.training.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
from cached_mslt.bench.steps import trainer_step
from cached_mslt.config import ModelArgs
from cached_mslt.models.bert import build_model
args = ModelArgs(preset="tiny", hidden_size=32, num_attention_heads=2, intermediate_size=64)
model = build_model(args, 65536, 2)
g = torch.Generator().manual_seed(0)
ids = torch.randint(5, 65536, (16, 128), generator=g)
labels = torch.where(torch.rand(16, 128, generator=g) < 0.4, ids, -100)
batch = {"labels": labels, "attention_mask": torch.ones_like(ids), "input_ids": ids}
step = trainer_step(model, 0, lambda: dict(batch))
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, max(faults[-2:]))
"""


def _faults_of_the_last_steps(mode: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[-2] == "True", int(out[-1])


# slow (`make test-slow`): 10-31 s each; the default suite took 12 minutes idle (2026-12-03)
@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's malloc")
def test_steps_reuse_freed_host_memory_without_page_faults():
    applied, kept = _faults_of_the_last_steps("keep")
    _, default = _faults_of_the_last_steps("default")
    assert applied
    assert default > 10_000  # glibc's default: the logits' pages faulted in every step
    assert kept < default / 100
