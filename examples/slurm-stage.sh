#!/bin/bash
# One MSLT stage on several nodes, the activation cache on an S3-compatible object store.
# docs/scaling.md explains the recipe; this script is that recipe under SLURM.
#
#   sbatch --nodes=4 examples/slurm-stage.sh runs/base/config.json 2
#
# What the nodes share: the repository and the run directory (config.json, stage-K/ with
# checkpoints and manifests, metrics.jsonl) on a shared filesystem. What they need not
# share: the cache, set in config.json as cache_url: s3://bucket/prefix.
# Credentials and endpoint come from the environment of every task (AWS_* variables, an
# instance role or ~/.aws), never from the config file.
#SBATCH --job-name=cached-mslt
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch examples/slurm-stage.sh CONFIG.json STAGE}
STAGE=${2:?usage: sbatch examples/slurm-stage.sh CONFIG.json STAGE}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
export CONFIG STAGE GPUS_PER_NODE MAIN_IP MAIN_PORT
# export AWS_ENDPOINT_URL=https://s3.example.org   # a non-AWS endpoint (MinIO, Ceph, ...)

# One `accelerate launch` per node (srun starts one task per node); each starts
# GPUS_PER_NODE processes. --kill-on-bad-exit: a failed node stops the others, and rerunning
# the same command resumes (finished shards and the last checkpoint are kept).
srun --kill-on-bad-exit=1 bash -c '
  accelerate launch --multi_gpu \
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT" \
    --mixed_precision bf16 --dynamo_backend no \
    pipelines/stage.py --config "$CONFIG" --stage "$STAGE"
'
