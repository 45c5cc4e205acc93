#!/usr/bin/env bash
# Set up the environment if needed, then run the test suite; extra arguments go to pytest.
#
#   bash scripts/test.sh                  # everything
#   bash scripts/test.sh -m "not distributed" -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
rc=0
python -m pytest tests -q "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests (exit code 5); check the selection (-k / -m) or tests/" >&2
fi
exit "$rc"
