"""Run stages under `accelerate launch` with two real ranks and a spy on the hot path in
each (used by tests/test_hot_path.py); writes RUN_DIR/spy-rank<N>.json: per stage, the
calls seen as [place, step, name, count].

usage: two_rank_spy.py PREPARED RUN_DIR STAGE[,STAGE...] JSON_OVERRIDES
"""

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from cached_mslt.stages import run_stage
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
spy = install(Spy())
seen = {}
for k in stages:
    spy.calls.clear()
    run_stage(small_run(prepared, run_dir, **overrides), k)
    seen[k] = [[*key, n] for key, n in spy.calls.items()]
Path(run_dir, f"spy-rank{state.process_index}.json").write_text(json.dumps(seen))
