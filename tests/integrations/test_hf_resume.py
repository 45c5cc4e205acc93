"""Trainer checkpoints carry the dimred state; resuming is exact, and survives a change of world size / stage.

Real processes (tests/integrations/hf_resume_script.py), a tiny GPT-2 with RigL at 80% sparsity:

* 2 ranks, ZeRO-2 (deepspeed launcher): a run interrupted after step 4 and resumed from
  checkpoint-4 ends with the same masks, compact optimizer state, weights and losses as an
  uninterrupted run;
* that ZeRO-2 checkpoint resumed by one plain process, whose checkpoint is then resumed by 2 ranks
  under ZeRO-3: right after each resume the masks and weights equal the saved ones, training goes on
  with pruned entries at 0 and the LR schedule where it was;
* a corrupted checkpoint, a checkpoint of another model, and a fresh run whose output_dir already
  holds a later dimred checkpoint raise before any step and write nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dimred_dist.distributed.checkpoint import read_manifest
from tests.launch import BIN, REPO, run_launcher

SCRIPT = REPO / "tests" / "integrations" / "hf_resume_script.py"

pytestmark = pytest.mark.distributed


def _run(mode: str, out: Path, *extra: str, port: int | None = None, zero: Path | None = None) -> list[dict]:
    args = [str(SCRIPT), mode, "--out", str(out), *extra] + (["--zero-config", str(zero)] if zero else [])
    if port is None:
        cmd, ranks = [sys.executable, *args], 1
    else:
        cmd, ranks = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), *args], 2
    proc = run_launcher(cmd, port, timeout=300, WANDB_MODE="disabled")
    paths = [out / f"result_rank{r}.json" for r in range(ranks)]
    assert all(p.is_file() for p in paths), proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in paths]


@pytest.fixture(scope="module")
def zero2_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2")
    return out, _run("equality", out, port=29631, zero=REPO / "configs" / "deepspeed" / "zero2.json")


@pytest.fixture(scope="module")
def one_process(zero2_runs):
    out = zero2_runs[0] / "one_process"
    return out, _run("resume", out, "--resume", str(zero2_runs[0] / "A" / "checkpoint-4"), "--errors")[0]


def test_interrupted_zero2_run_resumes_exactly(zero2_runs):
    out, ranks = zero2_runs
    manifest = read_manifest(out / "A" / "checkpoint-4")
    assert (manifest.world_size, manifest.zero_stage, manifest.step) == (2, 2, 4)
    for r in ranks:
        assert r["steps"] == [4, 8, 8, 8, 8]
        assert r["begin_masks_equal_saved"]
        assert r["final_masks_equal"] and r["final_weights_equal"]
        assert r["opt_state_equal"] and r["opt_state_keys"] > 0 and r["mask_bits_dtypes"] == ["torch.uint8"]
        assert r["losses_resumed"] == r["losses_uninterrupted"] and len(r["losses_resumed"]) == 4
        assert r["churn_after_resume"] > 0  # RigL kept updating the topology after the resume


def test_zero2_checkpoint_resumes_in_one_process(one_process):
    out, r = one_process
    assert (r["world_size"], r["zero_stage"], r["start"]) == (1, 0, 4)
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
        assert r["begin_masks_equal_saved"] and r["begin_weights_equal_saved"]
        assert r["steps"] == [10, 10] and len(r["losses"]) == 2
        assert r["sum_abs_pruned"] == 0.0 and r["density"] == pytest.approx(0.2, abs=1e-3)
    assert ranks[0]["losses"] == ranks[1]["losses"]


def test_bad_checksum_other_model_and_later_checkpoint_raise_before_training(one_process):
    r = one_process[1]["errors"]
    assert r["checksum"]["error"] == "CheckpointError" and "checksum mismatch" in r["checksum"]["message"]
    assert r["other_model"]["error"] == "CheckpointError"
    assert "from another model: parameter 'transformer.wte.weight' has shape (61, 32)" in r["other_model"]["message"]
    assert r["later_checkpoint"]["error"] == "FileExistsError"
    assert "already holds dimred checkpoints after step 0 (checkpoint-4)" in r["later_checkpoint"]["message"]
    for case in r.values():
        assert case["checkpoint_untouched"] and case["saved_checkpoints"] == [] and not case["manager_built"]
