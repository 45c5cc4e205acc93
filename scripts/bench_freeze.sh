#!/usr/bin/env bash
# What freezing layers mid-run saves (forward, backward, optimizer step, optimizer state),
# a 6-block GPT-2 under ZeRO-2 on 2 local processes (about a minute on 2 CPU cores).
#
#   bash scripts/bench_freeze.sh                          # the full benchmark, table on stdout
#   bash scripts/bench_freeze.sh --json runs/bench.json   # also write the records
#   bash scripts/bench_freeze.sh --quick                  # width 64, a smoke test
#
# Extra arguments go to scripts/bench_freeze.py (see --help). The master port is fixed on purpose:
# DeepSpeed's CPU shared-memory all-reduce leaves a buffer file per rank and port in /dev/shm.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
port="${BENCH_MASTER_PORT:-29563}"
rc=0
torchrun --nproc_per_node 2 --master_port "$port" scripts/bench_freeze.py "$@" || rc=$?
rm -f /dev/shm/deepspeed_allreduce_buffer_*_"${port}"_* 2>/dev/null || true
exit "$rc"
