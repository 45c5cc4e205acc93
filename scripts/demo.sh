#!/usr/bin/env bash
# The demo: a small GPT-2 trained on Debian's fortunes with 90% of its weights pruned (static
# random, ERK), as 2 local processes under gloo DDP on CPU. About 2 minutes on 2 cores.
#
#   bash scripts/demo.sh                      # defaults (see scripts/train_lm.py --help)
#   bash scripts/demo.sh --max-steps 200      # extra arguments go to train_lm.py
#
# NPROC (default 2) and MASTER_PORT (default: a free port) override the launch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
port="${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
exec python -m torch.distributed.run --nproc_per_node "${NPROC:-2}" --master_port "$port" scripts/train_lm.py "$@"
