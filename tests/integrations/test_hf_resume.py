"""Trainer checkpoints carry the dimred state; a killed run resumes exactly, also on another world size / stage.

Real processes (tests/integrations/hf_resume_script.py), a tiny GPT-2 with RigL at 80% sparsity:

* 2 ranks, ZeRO-2 (torchrun), four launches as a job scheduler would relaunch: a run with
  save_total_limit=1 killed by SIGKILL as it starts writing the dimred state of checkpoint-4, a run
  killed in step 5 after its backward, and one killed while writing the manifest of checkpoint-6,
  each resumed with ``resume_from_checkpoint=True``: each continues from its newest *complete*
  checkpoint (the cut-short one is skipped and renamed ``incomplete-checkpoint-N``) and ends with the
  same masks, weights, compact optimizer state, losses and metric counters as an uninterrupted run;
* an uninterrupted ZeRO-2 checkpoint resumed by one plain process, whose checkpoint is then resumed
  by 2 ranks under ZeRO-3: right after each resume the masks and weights equal the saved ones,
  training goes on with pruned entries at 0 and the LR schedule where it was;
* a corrupted checkpoint, a checkpoint of another model, and a fresh run whose output_dir already
  holds a later dimred checkpoint raise before any step and write nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dimred_dist.distributed.checkpoint import read_manifest
from tests.launch import REPO, run_launcher

SCRIPT = REPO / "tests" / "integrations" / "hf_resume_script.py"

pytestmark = pytest.mark.distributed


def _run(mode: str, out: Path, *extra: str, port: int | None = None, zero: Path | None = None,
         check: bool = True) -> list[dict]:
    args = [str(SCRIPT), mode, "--out", str(out), *extra] + (["--zero-config", str(zero)] if zero else [])
    if port is None:
        cmd, ranks = [sys.executable, *args], 1
    else:
        cmd, ranks = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                      str(port), *args], 2
    proc = run_launcher(cmd, port, timeout=300, WANDB_MODE="disabled")
    if not check:
        return [{"rc": proc.returncode, "log": proc.stdout + proc.stderr}]
    paths = [out / f"result_rank{r}.json" for r in range(ranks)]
    assert all(p.is_file() for p in paths), proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in paths]


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """Attempts 0-2 are each killed once; attempt 3 finishes the last run and trains the reference R."""
    out = tmp_path_factory.mktemp("crash")
    zero = REPO / "configs" / "deepspeed" / "zero2.json"
    runs = [_run("crash", out, "--attempt", str(a), port=29631 + a, zero=zero, check=False)[0] for a in range(4)]
    assert [r["rc"] != 0 for r in runs] == [True, True, True, False], runs[-1]["log"][-3000:]
    ranks = [json.loads((out / f"result_rank{r}.json").read_text()) for r in (0, 1)]
    return out, runs, ranks


@pytest.mark.parametrize("label,resumed_from,set_aside", [
    ("L", "checkpoint-2", "incomplete-checkpoint-4"),  # save_total_limit=1: checkpoint-2 was not deleted yet
    ("U", "checkpoint-4", None),
    ("W", "checkpoint-4", "incomplete-checkpoint-6"),
], ids=["killed writing dimred state, save_total_limit=1", "killed mid-step", "killed writing the manifest"])
def test_a_killed_zero2_run_resumes_from_its_newest_complete_checkpoint_exactly(crashed, label, resumed_from,
                                                                                 set_aside):
    out, runs, ranks = crashed
    log = "".join(k["log"] for k in runs)
    if set_aside:
        skipped = set_aside.removeprefix("incomplete-")
        assert f"resume_from_checkpoint=True skips {out / label / skipped}" in log
        assert f"{out / label / skipped} holds no complete dimred state" in log
    for r in ranks:
        got = r[label]
        assert got["resumed_from"] == resumed_from and got["steps"] == [8, 8]
        assert got["masks_equal"] and got["weights_equal"]
        assert got["opt_state_equal"] and got["opt_state_keys"] > 0
        assert got["losses"] == r["ref_losses"] and len(got["losses"]) == 8  # bit for bit, history included
        assert got["counters"] == r["ref_counters"] and r["ref_counters"]["dimred/topology_updates"] == 2
        assert r["ref_counters"]["dimred/churn"] > 0  # RigL updated the topology after the resume points
        assert (set_aside in got["folders"]) if set_aside else not any("incomplete" in f for f in got["folders"])
    if label == "L":
        assert [f for f in ranks[0]["L"]["folders"] if f.startswith("checkpoint-")] == ["checkpoint-8"]


@pytest.fixture(scope="module")
def zero2_runs(crashed):
    """The uninterrupted ZeRO-2 run R of the crash chain, with a checkpoint every 2 steps."""
    return crashed[0] / "R", crashed[2]


@pytest.fixture(scope="module")
def one_process(zero2_runs):
    out = zero2_runs[0] / "one_process"
    return out, _run("resume", out, "--resume", str(zero2_runs[0] / "checkpoint-4"), "--errors")[0]


def test_zero2_checkpoint_resumes_in_one_process(zero2_runs, one_process):
    manifest = read_manifest(zero2_runs[0] / "checkpoint-4")
    assert (manifest.world_size, manifest.zero_stage, manifest.step) == (2, 2, 4)
    assert "trainer_state.json" in manifest.checkpoint_files  # and every DeepSpeed file, verified on resume
    assert any(f.startswith("global_step4/") for f in manifest.checkpoint_files)
    out, r = one_process
    assert (r["world_size"], r["zero_stage"], r["start"]) == (1, 0, 4)
    assert r["begin_optimizer_steps"] == [manifest.optimizer_step] and manifest.optimizer_step > 0  # moments go on
    assert r["begin_masks_equal_saved"] and r["begin_weights_equal_saved"]
    assert r["steps"] == [8, 8] and len(r["losses"]) == 4
    assert r["sum_abs_pruned"] == 0.0 and r["density"] == pytest.approx(0.2, abs=1e-3)
    assert r["lr_last"] == 0.0  # the linear schedule was restored at step 4 and reached its end at 8
    assert read_manifest(out / "checkpoint-8").world_size == 1


def test_one_process_checkpoint_resumes_on_two_zero3_ranks(one_process, tmp_path):
    cfg = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    cfg["zero_optimization"].update(stage3_param_persistence_threshold=100, reduce_bucket_size=5e5,
                                    stage3_prefetch_bucket_size=5e5)  # most parameters really partitioned
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps(cfg))
    ranks = _run("resume", tmp_path / "run", "--resume", str(one_process[0] / "checkpoint-8"), "--steps", "10",
                 port=29632, zero=zero3)
    assert sum(r["local_entries"] for r in ranks) == one_process[1]["local_entries"]  # ZeRO-3 split the entries
    for r in ranks:
        assert (r["world_size"], r["zero_stage"], r["start"]) == (2, 3, 8)
        assert r["begin_optimizer_steps"] == [read_manifest(one_process[0] / "checkpoint-8").optimizer_step]
        assert r["begin_masks_equal_saved"] and r["begin_weights_equal_saved"]
        assert r["steps"] == [10, 10] and len(r["losses"]) == 2
        assert r["sum_abs_pruned"] == 0.0 and r["density"] == pytest.approx(0.2, abs=1e-3)
    assert ranks[0]["losses"] == ranks[1]["losses"]


def test_bad_checksum_other_model_and_later_checkpoint_raise_before_training(one_process):
    r = dict(one_process[1]["errors"])
    planted = r.pop("planted_pickle")
    assert not planted["ran"] and "Weights only load failed" in planted["error"]  # zero_to_fp32 ran no code
    assert r["checksum"]["error"] == "CheckpointError" and "checksum mismatch" in r["checksum"]["message"]
    assert r["other_model"]["error"] == "CheckpointError"
    assert "from another model: parameter 'transformer.wte.weight' has shape (61, 32)" in r["other_model"]["message"]
    assert r["later_checkpoint"]["error"] == "FileExistsError"
    assert "already holds dimred checkpoints after step 0 (checkpoint-4)" in r["later_checkpoint"]["message"]
    for case in r.values():
        assert case["checkpoint_untouched"] and case["saved_checkpoints"] == [] and not case["manager_built"]
