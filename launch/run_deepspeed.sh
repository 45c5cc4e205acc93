#!/usr/bin/env bash
# Launch a dimred-train job with DeepSpeed's launcher: one node, or several through a hostfile.
# The job's `deepspeed:` key names the DeepSpeed JSON (configs/deepspeed/zero{1,2,3}.json); change
# it for one run with --set deepspeed=configs/deepspeed/zero3.json.
#
#   launch/run_deepspeed.sh configs/jobs/tiny_gpt2_fortunes.yaml                      # all local GPUs
#   NUM_GPUS=2 MASTER_PORT=29600 launch/run_deepspeed.sh JOB.yaml --set training.max_steps=20
#   HOSTFILE=launch/deepspeed/hostfile.example launch/run_deepspeed.sh JOB.yaml        # multi-node (pdsh/ssh)
#
# On a machine without GPUs, NUM_GPUS is the number of CPU processes (DeepSpeed's CPU accelerator).
set -euo pipefail

if [ "$#" -lt 1 ]; then
    echo "usage: [NUM_GPUS=..] [HOSTFILE=..] [MASTER_PORT=..] $0 JOB.yaml [dimred-train args]" >&2
    exit 2
fi
JOB="$1"; shift

args=()
# Multi-node: "<host> slots=<gpus>" per line; the launcher starts every node over pdsh / ssh.
if [ -n "${HOSTFILE:-}" ]; then args+=(--hostfile "$HOSTFILE"); fi
# Processes per node (default: every visible GPU).
if [ -n "${NUM_GPUS:-}" ]; then args+=(--num_gpus "$NUM_GPUS"); fi
# Rendezvous port on the first node. DeepSpeed's CPU all-reduce leaves a /dev/shm file per port.
args+=(--master_port "${MASTER_PORT:-29500}")

# shellcheck source=launch/process_group.sh
source "$(dirname "${BASH_SOURCE[0]}")/process_group.sh"
run_group deepspeed "${args[@]}" --module dimred_dist.cli.train --config "$JOB" "$@"
