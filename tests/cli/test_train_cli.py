"""``dimred-train`` end to end: real launches of the CLI on tiny models (CPU, gloo).

Each run writes ``<output_dir>/dimred_summary.json``; the tests read it: the compact optimizer sits
inside the engine (ZeRO) or the Trainer's optimizer (no DeepSpeed), every optimizer step reached the
manager, pruned entries of the gathered weights are exactly 0 and the recipe's density holds.
"""

from __future__ import annotations

import os

import pytest

from tests.cli.jobs import (
    BIN,
    REPO,
    ds_json,
    env,
    launch,
    lm_job,
    recipe_file,
    summary,
    write_job,
    write_labeled,
    write_pretrained_bert,
)
from tests.launch import remove_shm_files

pytestmark = pytest.mark.distributed

MODULE = ["-m", "dimred_dist.cli.train"]
# Ports 29741-29746 belong to these tests: the other suites use 296xx, and two launches on one port
# collide in the rendezvous and in DeepSpeed's /dev/shm buffer names.


def _check_zero(s: dict, stage: int, launcher: str, density: float) -> None:
    assert s["launcher"] == launcher
    assert s["world_size"] == 2 and len(s["ranks"]) == 2
    assert s["engine"] == "DeepSpeedEngine"
    assert s["zero_stage"] == stage
    assert s["optimizer_chain"][1] == ("DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer")
    assert [r["inner_optimizer"] for r in s["ranks"]] == ["CompactAdamW", "CompactAdamW"]
    assert s["global_step"] == s["manager_step"] == 4
    assert s["max_abs_pruned"] == 0.0
    assert s["metrics"]["dimred/density"] == pytest.approx(density, abs=1e-3)
    assert s["eval_loss"] is not None and s["train_loss"] > 0


@pytest.mark.parametrize(
    "stage,recipe,port",
    [(2, "rigl_90.yaml", 29741), (3, "set_90.yaml", 29742)],
)
def test_deepspeed_launcher(tmp_path, stage, recipe, port):
    job = lm_job(tmp_path, recipe_file(recipe), ds_json(f"zero{stage}.json"))
    path = write_job(tmp_path, job)
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module", "dimred_dist.cli.train",
           "--config", str(path), "--set", "recipe.schedule.interval=2"]
    procs = launch([cmd], tmp_path, port)
    s = summary(tmp_path, procs)
    _check_zero(s, stage, "deepspeed", 0.1)
    assert s["recipe"]["method"] == recipe.split("_")[0]
    assert s["metrics"]["dimred/topology_updates"] >= 1 and s["metrics"]["dimred/churn"] > 0


def test_accelerate_launch(tmp_path):
    port = 29743
    # The job names the same JSON as the accelerate config: allowed, and not passed to TrainingArguments.
    job = lm_job(tmp_path, recipe_file("random_freeze_90.yaml"), ds_json("zero2.json"))
    path = write_job(tmp_path, job)
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "launch" / "accelerate" / "zero2.yaml"),
           "--main_process_port", str(port), *MODULE, "--config", str(path)]
    s = summary(tmp_path, launch([cmd], tmp_path, port))
    _check_zero(s, 2, "accelerate", 1.0)  # frozen entries are not pruned
    assert s["metrics"]["dimred/fraction/freeze"] == pytest.approx(0.9, abs=1e-3)


def test_two_nodes_over_loopback(tmp_path):
    """Two torchrun "nodes" (one process each) started side by side by launch/run_torchrun_multinode.sh."""
    port = 29744
    path = write_job(tmp_path, lm_job(tmp_path, recipe_file("static_erk_random_90.yaml"), ds_json("zero2.json")))
    cmds = [
        ["env", "NNODES=2", f"NODE_RANK={rank}", "MASTER_ADDR=127.0.0.1", f"MASTER_PORT={port}", "NPROC_PER_NODE=1",
         f"PYTHON={BIN / 'python'}", "bash", str(REPO / "launch" / "run_torchrun_multinode.sh"), str(path)]
        for rank in (0, 1)
    ]
    s = summary(tmp_path, launch(cmds, tmp_path, port))
    _check_zero(s, 2, "torchrun", 0.1)


def test_plain_python_pretrained_classifier(tmp_path):
    """One process, no DeepSpeed (the job's JSON is ignored): a local pretrained folder with its
    tokenizer, string labels from JSON lines, whole-tensor freezing, and the final model saved."""
    port = 29745  # unused by a single process; no /dev/shm file expected
    folder = write_pretrained_bert(tmp_path / "tiny_bert")
    job = {
        "model": {"pretrained": str(folder), "task": "sequence-classification"},
        "data": {"train_files": str(write_labeled(tmp_path / "train.jsonl")),
                 "validation_files": str(write_labeled(tmp_path / "val.jsonl", 16, seed=1)), "max_length": 16},
        "recipe": recipe_file("freeze_embeddings.yaml"),
        "deepspeed": ds_json("zero2.json"),
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "per_device_train_batch_size": 4,
                     "learning_rate": 1e-3, "save_strategy": "steps", "save_steps": 1000, "report_to": [],
                     "disable_tqdm": True},
    }
    path = write_job(tmp_path, job)
    procs = launch([[str(BIN / "dimred-train"), "--config", str(path)]], tmp_path, port)
    s = summary(tmp_path, procs)
    assert s["launcher"] == "python" and s["deepspeed"] is None and s["zero_stage"] in (None, 0)
    assert s["optimizer_chain"][-1] == "CompactAdamW"
    assert s["global_step"] == s["manager_step"] == 4
    assert s["frozen_tensors"] and all(".embeddings." in n or ".layer.0." in n for n in s["frozen_tensors"])
    assert s["metrics"]["dimred/density"] == 1.0  # sparsity 0: nothing pruned
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "config.json").is_file()
    assert "not used" in procs[0].stdout  # the warning about the ignored DeepSpeed JSON


def test_sigterm_to_a_launch_wrapper_stops_every_rank(tmp_path):
    """A scheduler's SIGTERM to launch/run_torchrun_multinode.sh reaches the ranks: none trains on."""
    import signal
    import subprocess
    import time

    port = 29746
    job = lm_job(tmp_path, recipe_file("rigl_90.yaml"), ds_json("zero2.json"), max_steps=100000, logging_steps=1)
    path = write_job(tmp_path, job)
    log = tmp_path / "wrapper.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(["env", "NPROC_PER_NODE=2", f"MASTER_PORT={port}", f"PYTHON={BIN / 'python'}", "bash",
                                 str(REPO / "launch" / "run_torchrun_multinode.sh"), str(path)],
                                cwd=REPO, env=env(tmp_path), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while "'loss'" not in log.read_text(errors="replace") and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert "'loss'" in log.read_text(errors="replace"), log.read_text()[-3000:]  # training is under way
        proc.send_signal(signal.SIGTERM)  # to the wrapper only, as `kill PID` would
        proc.wait(timeout=60)
        time.sleep(1)
        left = subprocess.run(["pgrep", "-f", str(path)], capture_output=True, text=True).stdout.split()
        assert left == [], f"processes of the job still running: {left}"
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", str(path)])
        remove_shm_files(port)
