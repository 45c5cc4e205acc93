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
REQUIRED = ("stage", "density", "mode", "state_ratio", "peak_rss_ratio", "step_ratio", "opt_state_bytes",
            "dense_opt_state_bytes", "opt_state_ratio", "step_time_ratio", "peak_rss_bytes", "memory_per_rank")
DENSITIES = (0.5, 0.1, 0.01)
CATEGORIES = ("weights", "masters", "optimizer", "gradients", "dimred", "zero_other")

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("bench_memory") / "bench.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(PORT),
           str(SCRIPT), "--quick", "--densities", ",".join(map(str, DENSITIES)), "--json", str(out)]
    proc = run_launcher(cmd, PORT, timeout=300)
    # Judged by what rank 0 wrote: the file is written before the closing barrier.
    assert out.is_file(), f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def test_records_cover_every_stage_mode_and_density(records):
    got = {(r["stage"], r["mode"], r["density"]) for r in records}
    assert got == {(s, "dense", 1.0) for s in (2, 3)} | {(s, m, d) for s in (2, 3) for m in ("masked", "lora")
                                                        for d in DENSITIES}
    for r in records:
        assert all(k in r for k in REQUIRED), sorted(set(REQUIRED) - set(r))
        assert r["opt_state_bytes"] > 0 and r["dense_opt_state_bytes"] > 0 and r["peak_rss_bytes"] > 0
        assert r["step_time_ratio"] > 0 and r["step_ratio"] == r["step_time_ratio"]
        assert r["state_ratio"] > 0 and r["peak_rss_ratio"] > 0
        for mem in r["memory_per_rank"]:
            assert set(mem) == {*CATEGORIES, "total"} and mem["total"] == sum(mem[k] for k in CATEGORIES)
            assert min(mem.values()) >= 0 and mem["weights"] > 0 and mem["masters"] > 0


def test_counted_categories_match_the_entries(records):
    """The counts from the tensors agree with what a rank must hold (fp32 here): Adam's two moments are
    twice the fp32 master partition; ZeRO-2 keeps the whole model's weights on every rank, ZeRO-3 a
    half; dimred's own state is the 2-bit masks plus the 1-bit ever-active mask of a dynamic method."""
    for r in records:
        for mem in r["memory_per_rank"]:
            if r["mode"] == "dense":
                assert abs(mem["optimizer"] - 2 * mem["masters"]) < 4096, (r["stage"], mem)
                assert mem["dimred"] == 0
            if r["mode"] == "masked":
                entries = mem["masters"] / 4  # the rank's partition: managed and unmanaged entries
                assert 0 < mem["dimred"] <= 0.4 * entries + 4096, (r["stage"], r["density"], mem)
                assert mem["optimizer"] < 2 * mem["masters"] * (r["density"] + 0.05)
        dense = next(x for x in records if x["stage"] == r["stage"] and x["mode"] == "dense")
        w_dense = [m["weights"] for m in dense["memory_per_rank"]]
        if r["stage"] == 2:
            assert all(m["weights"] >= 0.99 * max(w_dense) for m in r["memory_per_rank"])
        else:  # the partition, plus parameters below DeepSpeed's persistence threshold held whole
            masters = [m["masters"] for m in dense["memory_per_rank"]]
            full = max(m["weights"] for x in records if x["stage"] == 2 and x["mode"] == "dense"
                       for m in x["memory_per_rank"])
            assert all(0.98 * m <= w < full for w, m in zip(w_dense, masters)), (w_dense, masters, full)
        if r["mode"] == "dense":
            assert r["state_ratio"] == 1.0 and r["peak_rss_ratio"] == pytest.approx(1.0, abs=0.2)


def test_lora_trains_the_same_count_with_deepspeeds_adamw(records):
    # the dense run's fp32 masters, summed over the ranks, count the model's entries (4 bytes each)
    n_all = {r["stage"]: sum(m["masters"] for m in r["memory_per_rank"]) / 4
             for r in records if r["mode"] == "dense"}
    seen = 0
    for r in records:
        if r["mode"] != "lora":
            continue
        seen += 1
        assert "CompactAdamW" not in r["optimizer"] and r["lora_r"] >= 1
        assert r["train_fraction"] == pytest.approx(r["density"], rel=0.05, abs=2e-3)
        # two fp32 moments for every LoRA entry, partitioned over the ranks
        opt = sum(m["optimizer"] for m in r["memory_per_rank"])
        assert opt == pytest.approx(8 * r["train_fraction"] * n_all[r["stage"]], rel=0.05), r["stage"]
    assert seen == 2 * len(DENSITIES)


def test_dense_baseline_is_deepspeeds_own_adamw(records):
    for r in records:
        if r["density"] == 1.0:
            assert "CompactAdamW" not in r["optimizer"]
            assert r["opt_state_ratio"] == 1.0
            # two fp32 moments per entry the rank owns
            assert r["dense_opt_state_bytes"] % 8 == 0


def test_sparse_runs_hit_the_train_fraction_and_the_memory_target(records):
    for r in records:
        if r["mode"] != "masked":
            continue
        d = r["density"]
        assert r["optimizer"].endswith("CompactAdamW")
        assert r["zero_optimizer"] == ("DeepSpeedZeroOptimizer_Stage3" if r["stage"] == 3 else "DeepSpeedZeroOptimizer")
        assert r["train_fraction"] == pytest.approx(d, abs=1e-4)
        assert r["churn"] and r["churn"] > 0, "the RigL topology update did not run"
        assert r["opt_state_ratio"] <= d + 0.02, (r["stage"], d, r["opt_state_ratio_per_rank"])
        # and it is really compact: below the dense state by about the density
        assert r["opt_state_ratio"] >= d
