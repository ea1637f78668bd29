"""Freed host memory is kept for the next step (cached_mslt/host_memory.py): a large tensor
allocated again after it was freed costs no new page faults, where glibc's default
unmaps it and faults every page in again."""

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from cached_mslt.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
for _ in range(3):  # a step's transient 64 MB block, freed at the end of the step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, faults)
"""


def _faults_of_the_last_step(mode: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's malloc")
def test_a_freed_large_block_is_reused_without_page_faults():
    applied, kept = _faults_of_the_last_step("keep")
    _, default = _faults_of_the_last_step("default")
    assert applied
    assert default > 10_000  # 64 MB = 16,384 pages, faulted in again every time
    assert kept < 100
