"""Run one method under a wall-clock budget with two real ranks and check that both ranks
stopped at the same step (used by tests/test_budget.py).

usage: two_rank_budget.py PREPARED OUT_DIR METHOD WALL_S
"""

import sys

import torch
from accelerate import Accelerator

from cached_mslt.config import MethodArgs
from cached_mslt.methods.harness import run_method
from tests.conftest import small_run

prepared, out, name, wall_s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
accelerator = Accelerator()  # reads ACCELERATE_USE_CPU; a bare PartialState() would not
assert accelerator.num_processes == 2, f"expected 2 processes, got {accelerator.num_processes}"
args = small_run(prepared, out + "/unused", eval_every=1000, dropout=0.0)
result = run_method(name, args, MethodArgs(budget_wall_s=wall_s, stacking_layers="1,2,4"), out)
assert result["status"] == "ok", result.get("traceback")
steps = accelerator.gather(torch.tensor([result["clock"]["step"]]))
assert steps[0] == steps[1], f"ranks stopped at different steps: {steps.tolist()}"
accelerator.print(f"both ranks stopped at step {int(steps[0])}")
accelerator.end_training()  # leaves the process group (cached_mslt/training/processes.py)
