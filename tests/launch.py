"""Running real launchers (``torchrun``, ``deepspeed``, ``accelerate launch``) from tests.

DeepSpeed's CPU shared-memory all-reduce leaves one ``/dev/shm`` buffer file per rank, named after
the master port; :func:`run_launcher` removes those of its port whatever happens.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def remove_shm_files(port: int) -> None:
    for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        os.remove(f)


def run_launcher(cmd: list[str], port: int | None, *, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repository with the package importable and ``env`` added to the environment."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **env)
    try:
        return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    finally:
        if port is not None:
            remove_shm_files(port)
