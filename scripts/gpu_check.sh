#!/usr/bin/env bash
# One command that checks this trainer on a GPU (docs/quickstart.md, "Checking a GPU"):
# the cached == live equivalence, hot-path and two-rank tests on CUDA, the trainer's step
# on the GPU in bf16 against float32 (`bench.py --variants precision --device cuda`), and
# a short `make run` shape on the GPU
# (all four tiny stages, bf16), each logged, with one report at $REPORT.
# Without CUDA it says so, writes that to the report and exits 0. Under 10 minutes on one
# GPU. Usage: scripts/gpu_check.sh [python] (default: .venv/bin/python, else python3).
set -u
cd "$(dirname "$0")/.."
PY=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${GPU_CHECK_DIR:-runs/gpu-check}
REPORT=$OUT/report.md
mkdir -p "$OUT"
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
if [ "$GPUS" = "0" ]; then
  echo "gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing to check" | tee "$REPORT"
  exit 0
fi
export CACHED_MSLT_TEST_DEVICE=cuda PYTHONPATH=$PWD
NAME=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
{
  echo "# gpu-check: $GPUS x $NAME, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null)"
  echo
  echo "| check | result | seconds | log |"
  echo "|---|---|---|---|"
} > "$REPORT"
FAILED=0
check() { # name, command...
  local name=$1; shift
  local log="$OUT/$name.log" began=$SECONDS
  if "$@" > "$log" 2>&1; then result=ok; else result="**FAILED** (exit $?)"; FAILED=1; fi
  echo "| $name | $result | $((SECONDS - began)) | $log |" >> "$REPORT"
  echo "gpu-check: $name: $result"
}
check equivalence "$PY" -m pytest -q tests/test_cached_equals_live.py
check hot-path "$PY" -m pytest -q tests/test_hot_path.py -k "not two_ranks"
if [ "$GPUS" -ge 2 ]; then
  check two-ranks "$PY" -m pytest -q tests/test_distributed.py tests/test_hot_path.py -k "two_ranks or distributed"
else
  echo "| two-ranks | skipped: one GPU (NCCL needs a device per rank) | 0 | |" >> "$REPORT"
fi
check bench-bf16 "$PY" pipelines/bench.py --variants precision --preset tiny --repeats 3 \
  --device cuda
check prepare "$PY" pipelines/prepare_data.py --preset tiny --prepared_dir "$OUT/prepared"
check run-bf16 "$PY" pipelines/pretrain.py --preset tiny --run_dir "$OUT/run" \
  --prepared_dir "$OUT/prepared" --stage_steps 50 --train_examples 2048 --eval_batches 4 \
  --mixed_precision bf16
[ -f "$OUT/run/summary.md" ] && { echo; echo "## the run"; echo; cat "$OUT/run/summary.md"; } >> "$REPORT"
echo "gpu-check: report in $REPORT"
exit $FAILED
