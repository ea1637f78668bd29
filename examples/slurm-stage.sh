#!/bin/bash
# An MSLT run on several nodes under SLURM: one `accelerate launch` per node, every stage in
# one job (pipelines/pretrain.py), or one stage (pipelines/stage.py) when STAGE is given.
# docs/scaling.md explains the recipe; this script is that recipe. Submit from the
# repository's root, after writing the run's config once (on the login node):
#
#   python pipelines/pretrain.py --preset bert-base --run_dir runs/base \
#       --cache_url s3://my-bucket/runs/base --write_config
#   python -m storage.bucket s3://my-bucket                      # if the bucket is new
#   sbatch --nodes=4 --gpus-per-node=8 examples/slurm-stage.sh runs/base/config.json
#
# One stage per job instead, each job starting when the previous one succeeded:
#   prev=$(sbatch --parsable --nodes=4 --gpus-per-node=8 examples/slurm-stage.sh runs/base/config.json 1)
#   for k in 2 3 4; do prev=$(sbatch --parsable --dependency=afterok:$prev --nodes=4 \
#       --gpus-per-node=8 examples/slurm-stage.sh runs/base/config.json $k); done
#
# What the nodes share: the repository, its venv and the run directory (config.json, stage-K/
# with checkpoints and manifests, metrics.jsonl) on a shared filesystem. What they need not
# share: the cache, set in config.json as cache_url: s3://bucket/prefix. Credentials and
# endpoint come from the environment of every task (AWS_* variables, an instance role or
# ~/.aws), never from the config file. Rerunning the same command resumes a stopped run.
#SBATCH --job-name=cached-mslt
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
# No pipefail: nothing here pipes into a command that may stop reading early.
set -eu

usage="usage: sbatch --nodes=N --gpus-per-node=G examples/slurm-stage.sh CONFIG.json [STAGE]"
CONFIG=${1:?$usage}
STAGE=${2:-}
[ -f "$CONFIG" ] || { echo "error: $CONFIG does not exist; write it first: python pipelines/pretrain.py ... --write_config" >&2; exit 2; }
cd "${SLURM_SUBMIT_DIR:-.}"

# One GPU count, the one SLURM allocated (--gpus-per-node, maybe typed as a100:8).
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:?"submit with --gpus-per-node=G: the process count follows it"}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}
VENV=${VENV:-$PWD/.venv}
# shellcheck disable=SC1091
source "$VENV/bin/activate"  # the venv's accelerate and python on every node (srun inherits it)

# Node 0's address (torch.distributed's rendezvous), not its host name: a name may resolve
# to another interface on other nodes. The batch script runs on node 0.
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MAIN_IP=$(getent ahostsv4 "${NODES[0]}" | awk 'NR == 1 {print $1}')
[ -n "$MAIN_IP" ] || { echo "error: no IPv4 address for ${NODES[0]} (getent ahostsv4)" >&2; exit 2; }
MAIN_PORT=${MAIN_PORT:-29500}
if [ -n "$STAGE" ]; then SCRIPT="pipelines/stage.py --stage $STAGE"; else SCRIPT=pipelines/pretrain.py; fi
export CONFIG SCRIPT GPUS_PER_NODE MAIN_IP MAIN_PORT
# export AWS_ENDPOINT_URL=https://s3.example.org   # a non-AWS endpoint (MinIO, Ceph, ...)
echo "nodes ${NODES[*]}, $GPUS_PER_NODE GPUs each, main $MAIN_IP:$MAIN_PORT: $SCRIPT --config $CONFIG"

# srun starts one task per node; each `accelerate launch` starts GPUS_PER_NODE processes.
# --kill-on-bad-exit: a failed node stops the others. bf16 from the launcher: the run
# follows it (refused with a message on GPUs without native bfloat16, docs/scaling.md).
srun --kill-on-bad-exit=1 bash -c '
  exec accelerate launch --multi_gpu \
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT" \
    --mixed_precision bf16 --dynamo_backend no \
    $SCRIPT --config "$CONFIG"
'
