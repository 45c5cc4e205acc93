#!/usr/bin/env bash
# Optimizer-state memory and step time of the compact optimizer vs DeepSpeed's dense AdamW,
# GPT-2 small under ZeRO-2 and ZeRO-3 on 2 local processes (about 10 minutes on 2 CPU cores).
#
#   bash scripts/bench_memory.sh                          # the full benchmark, table on stdout
#   bash scripts/bench_memory.sh --json runs/bench.json   # also write the records
#   bash scripts/bench_memory.sh --quick                  # tiny GPT-2, a smoke test (~40 s)
#
# Extra arguments go to scripts/bench_memory.py (see --help). The master port is fixed on purpose:
# DeepSpeed's CPU shared-memory all-reduce leaves a buffer file per rank and port in /dev/shm.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
port="${BENCH_MASTER_PORT:-29561}"
rc=0
torchrun --nproc_per_node 2 --master_port "$port" scripts/bench_memory.py "$@" || rc=$?
rm -f /dev/shm/deepspeed_allreduce_buffer_*_"${port}"_* 2>/dev/null || true
exit "$rc"
