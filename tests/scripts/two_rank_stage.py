"""Run one stage under `accelerate launch` with two real ranks (used by tests/test_distributed.py).

usage: two_rank_stage.py PREPARED RUN_DIR STAGE[,STAGE...] JSON_OVERRIDES
"""

import json
import sys

from accelerate import Accelerator

from cached_mslt.stages import run_stage
from tests.conftest import small_run

prepared, run_dir, stage, overrides = (
    sys.argv[1],
    sys.argv[2],
    [int(k) for k in sys.argv[3].split(",")],
    json.loads(sys.argv[4]),
)
state = Accelerator()  # reads ACCELERATE_USE_CPU; a bare PartialState() would not
assert state.num_processes == 2, f"expected 2 processes, got {state.num_processes}"
for k in stage:  # several stages in one launch: one start-up of both ranks
    run_stage(small_run(prepared, run_dir, **overrides), k)
