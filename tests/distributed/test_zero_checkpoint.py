"""Resume equality through DeepSpeed's own checkpoint, ZeRO stages 1-3, 2 real CPU ranks."""

from __future__ import annotations

import json
import sys

import pytest

from tests.launch import REPO, run_launcher

SCRIPT = REPO / "tests" / "distributed" / "zero_checkpoint_script.py"

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("stage,port", [(1, 29611), (2, 29612), (3, 29613)])
def test_resume_through_deepspeed_checkpoint_is_exact(tmp_path, stage, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(SCRIPT), str(stage), str(tmp_path)]
    proc = run_launcher(cmd, port, timeout=240)
    paths = [tmp_path / f"result_rank{r}.json" for r in (0, 1)]
    assert all(p.is_file() for p in paths), proc.stdout[-3000:] + proc.stderr[-3000:]
    for p in paths:
        r = json.loads(p.read_text())
        assert r["opt_state_equal"], "compact optimizer state changed through save/load"
        assert r["mask_bits_dtypes"] == ["torch.uint8"]
        assert r["masks_equal"] and r["weights_equal"]
        assert r["losses_resumed"] == r["losses"]
        assert r["steps"] == [9, 9]
        assert r["churn"] > 0  # topology updates happened after the resume point
