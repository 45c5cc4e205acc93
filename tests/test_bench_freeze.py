"""Smoke test of scripts/bench_freeze.py: ``--quick`` as 2 real processes (torchrun, DeepSpeed on gloo).

Checks the records: every configuration and phase is there, FreezeOut froze its group at the
planned step and gave back its optimizer state (after freezing it holds what a model built with
those parameters frozen holds), and the dense run holds the most. Times are not judged: the quick
model is too small for them to mean anything.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.launch import REPO, run_launcher

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

SCRIPT = REPO / "scripts" / "bench_freeze.py"
PORT = 29564  # distinct from the other DeepSpeed tests' ports (a /dev/shm buffer per port)

pytestmark = pytest.mark.distributed


def test_quick_run_records(tmp_path):
    out = tmp_path / "freeze.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(PORT),
           str(SCRIPT), "--quick", "--json", str(out)]
    proc = run_launcher(cmd, PORT, timeout=300)
    assert out.is_file(), f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    rows = {(r["config"], r["phase"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {("dense", "first"), ("dense", "last"), ("freezeout", "before"), ("freezeout", "after"),
                         ("requires_grad", "all")}
    assert all(r[k] > 0 for r in rows.values() for k in ("forward_s", "backward_s", "step_s"))
    dense, dense_last, after, before, static = (rows[k]["opt_state_bytes"] for k in sorted(rows))
    assert dense == dense_last
    assert rows[("freezeout", "before")]["freeze_step"] == 3, "warm-up 1 + 2 steps before the group freezes"
    assert before >= dense > after, "freezing gives the group's optimizer state back"
    # the manager's bitmask (1 bit per managed entry, 1/64 of dense Adam state) is the difference
    assert static <= after <= static + dense / 64, "after freezing: what a model built frozen holds, plus the mask"
