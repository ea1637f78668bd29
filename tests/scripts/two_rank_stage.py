"""Run stages under `accelerate launch` with two real ranks (used by tests/test_distributed.py
and tests/test_hot_path.py). With `--spy`, a spy on the hot path runs in each rank and
RUN_DIR/spy-rank<N>.json gets, per stage, the calls it saw as [place, step, name, count].

usage: two_rank_stage.py PREPARED RUN_DIR STAGE[,STAGE...] JSON_OVERRIDES [--spy]
"""

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from cached_mslt.stages.runner import run_stage
from tests.conftest import small_run
from tests.spy import Spy, install

prepared, run_dir, stages, overrides = (
    sys.argv[1],
    sys.argv[2],
    [int(k) for k in sys.argv[3].split(",")],
    json.loads(sys.argv[4]),
)
state = Accelerator()  # reads ACCELERATE_USE_CPU; a bare PartialState() would not
assert state.num_processes == 2, f"expected 2 processes, got {state.num_processes}"
spy = install(Spy()) if "--spy" in sys.argv[5:] else None
seen = {}
for k in stages:  # several stages in one launch: one start-up of both ranks
    if spy is not None:
        spy.calls.clear()
    run_stage(small_run(prepared, run_dir, **overrides), k)
    if spy is not None:
        seen[k] = [[*key, n] for key, n in spy.calls.items()]
if spy is not None:
    Path(run_dir, f"spy-rank{state.process_index}.json").write_text(json.dumps(seen))
state.end_training()  # leaves the process group (cached_mslt/training/processes.py)
