"""Smoke test of scripts/bench_memory.py: ``--quick`` as 2 real processes (torchrun, DeepSpeed on gloo).

Checks the JSON records the benchmark writes: every stage and density is there with the documented
keys, the sparse configurations really ran the compact optimizer (and one RigL topology update)
inside ZeRO at the requested TRAIN fraction, and the optimizer state per rank is at most
``density + 0.02`` of DeepSpeed's dense AdamW state. Step times are not judged here: the quick
model is far too small for them to mean anything.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.launch import REPO, run_launcher

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

SCRIPT = REPO / "scripts" / "bench_memory.py"
#: Fixed, and distinct from the other DeepSpeed tests' ports: DeepSpeed's CPU shared-memory
#: all-reduce leaves a buffer file per rank and port in /dev/shm (removed below anyway).
PORT = 29562
REQUIRED = ("stage", "density", "opt_state_bytes", "dense_opt_state_bytes", "opt_state_ratio", "step_time_ratio",
            "peak_rss_bytes")
DENSITIES = (0.5, 0.2, 0.1, 0.05)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("bench_memory") / "bench.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(PORT),
           str(SCRIPT), "--quick", "--json", str(out)]
    proc = run_launcher(cmd, PORT, timeout=300)
    # Judged by what rank 0 wrote: the file is written before the closing barrier.
    assert out.is_file(), f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def test_records_cover_every_stage_and_density(records):
    got = {(r["stage"], r["density"]) for r in records}
    assert got == {(s, d) for s in (2, 3) for d in (1.0, *DENSITIES)}
    for r in records:
        assert all(k in r for k in REQUIRED), sorted(set(REQUIRED) - set(r))
        assert r["opt_state_bytes"] > 0 and r["dense_opt_state_bytes"] > 0 and r["peak_rss_bytes"] > 0
        assert r["step_time_ratio"] > 0


def test_dense_baseline_is_deepspeeds_own_adamw(records):
    for r in records:
        if r["density"] == 1.0:
            assert "CompactAdamW" not in r["optimizer"]
            assert r["opt_state_ratio"] == 1.0
            # two fp32 moments per entry the rank owns
            assert r["dense_opt_state_bytes"] % 8 == 0


def test_sparse_runs_hit_the_train_fraction_and_the_memory_target(records):
    for r in records:
        if r["density"] == 1.0:
            continue
        d = r["density"]
        assert r["optimizer"].endswith("CompactAdamW")
        assert r["zero_optimizer"] == ("DeepSpeedZeroOptimizer_Stage3" if r["stage"] == 3 else "DeepSpeedZeroOptimizer")
        assert r["train_fraction"] == pytest.approx(d, abs=1e-4)
        assert r["churn"] and r["churn"] > 0, "the RigL topology update did not run"
        assert r["opt_state_ratio"] <= d + 0.02, (r["stage"], d, r["opt_state_ratio_per_rank"])
        # and it is really compact: below the dense state by about the density
        assert r["opt_state_ratio"] >= d
