"""The HF Trainer path under real DeepSpeed ZeRO-2/3, launched by `deepspeed` and `accelerate launch`.

Each case runs tests/integrations/hf_trainer_script.py as 2 CPU processes and checks what the ranks
wrote: the compact optimizer really sits inside the ZeRO engine, the manager counted every step,
pruned entries of the gathered weights are exactly 0, the density reached the Trainer's log
history, and the ranks agree on the metrics.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.launch import BIN, REPO, run_launcher

SCRIPT = REPO / "tests" / "integrations" / "hf_trainer_script.py"

pytestmark = pytest.mark.distributed


def _launch(launcher: str, stage: int, out: Path, port: int, *extra: str) -> subprocess.CompletedProcess:
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), str(SCRIPT),
               "--out", str(out), "--zero-config", str(REPO / "configs" / "deepspeed" / f"zero{stage}.json")]
    else:
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "launch" / "accelerate" / f"zero{stage}.yaml"),
               "--main_process_port", str(port), str(SCRIPT), "--out", str(out)]
    return run_launcher(cmd + list(extra), port, timeout=240, WANDB_MODE="disabled")


SNIP = {"method": "snip", "sparsity": 0.8, "distribution": "global", "seed": 5, "args": {"batches": 2}}


@pytest.mark.parametrize("launcher,stage,port", [("deepspeed", 3, 29605), ("accelerate", 2, 29606)])
def test_trainer_probes_snip_with_the_same_batches_on_every_rank(tmp_path, launcher, stage, port):
    """The callback draws the probe batches from the Trainer's train set with the recipe's seed (the same on
    every rank); the initial masks under ZeRO equal one process scoring those batches."""
    import torch
    from transformers import default_data_collator

    import dimred_dist
    from tests.integrations.tiny_lm import tiny_lm_and_data

    proc = _launch(launcher, stage, tmp_path, port, "--recipe", json.dumps(SNIP))
    results = [tmp_path / f"result_rank{r}.json" for r in (0, 1)]
    assert all(p.is_file() for p in results), proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads(p.read_text()) for p in results]
    model, ds = tiny_lm_and_data()
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(SNIP["seed"]))[:4].tolist()
    batches = [default_data_collator([ds[i] for i in order[k * 2 : (k + 1) * 2]]) for k in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = dimred_dist.DimRedManager(dimred_dist.load_recipe(SNIP), model)
        ref.prepare(probe=dimred_dist.ProbeData(batches))
    finally:
        torch.set_num_threads(threads)
    for name, ps in ref.state.params.items():
        full = torch.zeros(ps.keep.numel(), dtype=torch.bool)
        for r in ranks:
            start, end, keep = r["initial_masks"][name]
            full[start:end] = torch.tensor(keep, dtype=torch.bool)
        assert torch.equal(full, ps.keep), f"{launcher} ZeRO-{stage}: the SNIP mask of {name} differs from one process"
    for r in ranks:
        assert r["manager_step"] == r["global_step"] == 6 and r["max_abs_pruned"] == 0.0
        assert r["metrics"]["dimred/density"] == pytest.approx(0.2, abs=1e-3)


@pytest.mark.parametrize(
    "launcher,stage,port",
    [("deepspeed", 2, 29601), ("deepspeed", 3, 29602), ("accelerate", 2, 29603), ("accelerate", 3, 29604)],
)
def test_trainer_runs_compact_optimizer_inside_zero(tmp_path, launcher, stage, port):
    proc = _launch(launcher, stage, tmp_path, port)
    results = [tmp_path / f"result_rank{r}.json" for r in (0, 1)]
    # Judged by what the ranks wrote: a crash at teardown after the results must not hide them,
    # and a missing result shows the launcher's output.
    assert all(p.is_file() for p in results), proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads(p.read_text()) for p in results)
    for r in (r0, r1):
        assert r["world_size"] == 2
        assert r["engine"] == "DeepSpeedEngine"
        assert r["zero_optimizer"] == ("DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer")
        assert r["inner_optimizer"] == "CompactAdamW"
        assert r["zero_stage"] == stage
        assert r["manager_step"] == r["global_step"] == 6
        assert r["max_abs_pruned"] == 0.0
        assert r["metrics"]["dimred/density"] == pytest.approx(0.2, abs=1e-4)
        assert r["logged_density"] and all(d == pytest.approx(0.2, abs=1e-4) for d in r["logged_density"])
        assert r["metrics"]["dimred/churn"] > 0  # RigL updated the topology during the run
    assert r0["metrics"] == pytest.approx(r1["metrics"], rel=0, abs=0.0) or _same_but_time(r0, r1)


def _same_but_time(a: dict, b: dict) -> bool:
    keys = [k for k in a["metrics"] if k != "dimred/topology_update_seconds"]
    return all(a["metrics"][k] == b["metrics"][k] for k in keys)


IMP = {"method": "imp", "sparsity": 0.75, "distribution": "uniform",
       "schedule": {"kind": "imp", "rounds": 2, "round_steps": 2, "rewind_step": 0}}


def test_trainer_runs_imp_rounds_inside_one_train_call(tmp_path):
    """Two rounds of prune-and-rewind inside trainer.train() under ZeRO-2: the rounds run at their steps,
    the density halves each round, and the LR schedule (linear decay) returns to step 0's at each round."""
    proc = _launch("deepspeed", 2, tmp_path, 29607, "--recipe", json.dumps(IMP), "--steps", "6")
    results = [tmp_path / f"result_rank{r}.json" for r in (0, 1)]
    assert all(p.is_file() for p in results), proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in (json.loads(p.read_text()) for p in results):
        assert [(h["step"], h["round"]) for h in r["history"]] == [(2.0, 1.0), (4.0, 2.0)]
        assert [h["target_density"] for h in r["history"]] == pytest.approx([0.5, 0.25])
        assert r["metrics"]["dimred/density"] == pytest.approx(0.25, abs=1e-3) and r["max_abs_pruned"] == 0.0
        # logged every 2 steps, each the LR of the last step: step 1 is lr(1); steps 3 and 5, the first steps
        # of rounds 1 and 2 (steps 2 and 4 apply nothing), are back at lr(0), the initial 1e-3
        lrs = r["learning_rates"]
        assert lrs == pytest.approx([1e-3 * 5 / 6, 1e-3, 1e-3])
