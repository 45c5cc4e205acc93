#!/usr/bin/env bash
# Launch a dimred-train job with `accelerate launch` and a DeepSpeed accelerate config.
# accelerate takes the DeepSpeed settings from its config file (deepspeed_config_file); the CLI then
# does not pass deepspeed= to TrainingArguments, and the job's `deepspeed:` key must name the same
# JSON or be null.
#
#   launch/run_accelerate.sh configs/jobs/tiny_gpt2_fortunes.yaml                     # ZeRO-2, one node
#   ACC_CONFIG=launch/accelerate/zero3.yaml launch/run_accelerate.sh JOB.yaml --set deepspeed=configs/deepspeed/zero3.json
#   # multi-node: on every node, with that node's rank
#   ACC_CONFIG=launch/accelerate/multinode_zero2.yaml MACHINE_RANK=1 MAIN_PROCESS_IP=10.0.0.1 \
#       launch/run_accelerate.sh JOB.yaml
set -euo pipefail

if [ "$#" -lt 1 ]; then
    echo "usage: [ACC_CONFIG=..] [MACHINE_RANK=..] [MAIN_PROCESS_IP=..] [MAIN_PROCESS_PORT=..] $0 JOB.yaml [dimred-train args]" >&2
    exit 2
fi
JOB="$1"; shift

# The accelerate config (launch/accelerate/zero{1,2,3}.yaml or multinode_zero{1,2,3}.yaml).
args=(--config_file "${ACC_CONFIG:-launch/accelerate/zero2.yaml}")
# Each overrides the same key of the accelerate config, so one multi-node file serves every node.
if [ -n "${MACHINE_RANK:-}" ]; then args+=(--machine_rank "$MACHINE_RANK"); fi
if [ -n "${MAIN_PROCESS_IP:-}" ]; then args+=(--main_process_ip "$MAIN_PROCESS_IP"); fi
if [ -n "${MAIN_PROCESS_PORT:-}" ]; then args+=(--main_process_port "$MAIN_PROCESS_PORT"); fi
if [ -n "${NUM_PROCESSES:-}" ]; then args+=(--num_processes "$NUM_PROCESSES"); fi

# shellcheck source=launch/process_group.sh
source "$(dirname "${BASH_SOURCE[0]}")/process_group.sh"
run_group accelerate launch "${args[@]}" -m dimred_dist.cli.train --config "$JOB" "$@"
