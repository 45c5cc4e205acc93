#!/usr/bin/env bash
# Multi-node launch of a dimred-train job with torchrun and a static rendezvous: run this once on
# every node, with the same job, NNODES, MASTER_ADDR and MASTER_PORT and that node's NODE_RANK.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#       launch/run_torchrun_multinode.sh configs/jobs/tiny_gpt2_fortunes.yaml [--set training.max_steps=50]
#
# Two "nodes" on one machine (how the test suite checks this path): start NODE_RANK=0 and
# NODE_RANK=1 side by side with MASTER_ADDR=127.0.0.1 and NPROC_PER_NODE=1.
# DeepSpeed is used when the job names a DeepSpeed JSON (its `deepspeed:` key); otherwise DDP.
# Under SLURM, launch/slurm/dimred_multinode.sbatch sets these variables from the allocation.
set -euo pipefail

if [ "$#" -lt 1 ]; then
    echo "usage: [NNODES=..] [NODE_RANK=..] [MASTER_ADDR=..] [MASTER_PORT=..] [NPROC_PER_NODE=..] $0 JOB.yaml [dimred-train args]" >&2
    exit 2
fi
JOB="$1"; shift

# Nodes taking part, and this node's index among them (0 is the one at MASTER_ADDR).
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
# Address and free TCP port of node 0, reachable from every node.
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
# Processes on this node: one per GPU by default, 1 on a machine without GPUs.
PYTHON="${PYTHON:-python}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"

# shellcheck source=launch/process_group.sh
source "$(dirname "${BASH_SOURCE[0]}")/process_group.sh"
run_group "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m dimred_dist.cli.train --config "$JOB" "$@"
