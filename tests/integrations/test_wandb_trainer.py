"""End to end: a Trainer run (tiny GPT-2, RigL, 2 ranks, DeepSpeed ZeRO-2) reporting to a real W&B run in
offline mode; the test reads back what the run directory holds.

Checked there: one run (rank 0's), whose history rows carry the dimred metrics under the Trainer's
``train/`` prefix with the values the ranks computed (density at the budget, ITOP, churn together
with the step of the update it belongs to, optimizer bytes summed over both ranks), and the plots as
images whose PNG files are in the run's media folder; the same PNGs are in ``{output_dir}/dimred_plots``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.integrations import wandb_offline
from tests.launch import BIN, REPO, run_launcher

SCRIPT = REPO / "tests" / "integrations" / "wandb_trainer_script.py"
PORT = 29631
PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.distributed


def _launch(out: Path) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(PORT), str(SCRIPT), "--out", str(out),
           "--zero-config", str(REPO / "configs" / "deepspeed" / "zero2.json")]
    return run_launcher(cmd, PORT, timeout=240, WANDB_MODE="offline", WANDB_DIR=str(out), WANDB_SILENT="true",
                        WANDB_PROJECT="dimred-test", WANDB_CONSOLE="off")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wandb_e2e")
    proc = _launch(out)
    results = [out / f"result_rank{r}.json" for r in (0, 1)]
    assert all(p.is_file() for p in results), proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted((out / "wandb").glob("offline-run-*"))
    return out, [json.loads(p.read_text()) for p in results], runs


def test_one_run_from_rank_zero(run):
    _, (r0, r1), runs = run
    assert len(runs) == 1
    assert r0["wandb_run_active"] and not r1["wandb_run_active"]
    assert r0["zero_stage"] == r1["zero_stage"] == 2 and r0["inner_optimizer"] == "CompactAdamW"


def test_metrics_in_the_run_history(run):
    _, (r0, r1), (run_dir,) = run
    rows = [r for r in wandb_offline.history(run_dir) if "train/dimred/density" in r]
    assert [r["train/global_step"] for r in rows] == [2, 4, 6, 8, 8]  # 4 logs + the Trainer's closing log
    for row in rows:
        assert row["train/dimred/density"] == pytest.approx(0.2, abs=1e-4)
        assert row["train/dimred/density"] <= row["train/dimred/itop_rate"] <= 1.0
        assert row["train/dimred/optimizer/reclaimed_bytes"] > 0
    itop = [r["train/dimred/itop_rate"] for r in rows]
    assert itop == sorted(itop) and itop[-1] > itop[0]  # RigL explores: ever-active entries only grow

    # Churn travels with the step of the update it belongs to: none before the first update
    # (before optimizer step 2), then the latest update's values, repeated with that step.
    history = {int(h["step"]): h for h in r0["history"]}
    assert sorted(history) == [2, 4]
    assert "train/dimred/churn" not in rows[0]
    assert [r["train/dimred/last_update_step"] for r in rows[1:]] == [2, 4, 4, 4]
    for row in rows[1:]:
        h = history[int(row["train/dimred/last_update_step"])]
        assert row["train/dimred/churn"] == h["churn"] > 0
        assert row["train/dimred/drop_fraction"] == h["drop_fraction"]
        assert row["train/dimred/topology_updates"] == len([s for s in history if s <= h["step"]])

    last = rows[-1]
    for key, value in r0["metrics"].items():
        if key != "dimred/topology_update_seconds":
            assert last["train/" + key] == value, key
            assert r1["metrics"][key] == value, key  # every rank computed the same metrics

    # Bytes: the sum over both ranks, and the rank holding the most state.
    (s0, d0), (s1, d1) = r0["opt_bytes"], r1["opt_bytes"]
    assert last["train/dimred/optimizer/state_bytes"] == s0 + s1
    assert last["train/dimred/optimizer/dense_bytes"] == d0 + d1
    assert last["train/dimred/optimizer/reclaimed_bytes"] == d0 + d1 - s0 - s1
    big = max((s0, d0), (s1, d1))
    assert last["train/dimred/optimizer/rank_state_bytes"] == big[0]
    assert last["train/dimred/optimizer/rank_dense_bytes"] == big[1]
    assert (s0 + s1) / (d0 + d1) < 0.35  # density 0.2 plus bit masks, step counters and unmanaged biases


def test_plots_in_the_run_and_next_to_it(run):
    out, _, (run_dir,) = run
    rows = wandb_offline.history(run_dir)
    for name in ("layer_density", "churn"):
        images = [r[f"dimred/plots/{name}"] for r in rows if f"dimred/plots/{name}" in r]
        assert len(images) >= 2  # every 2nd log (plot_every=2) and at the end
        for img in images:
            assert img["_type"] == "image-file" and img["format"] == "png"
            assert (run_dir / "files" / img["path"]).read_bytes()[:8] == PNG
        saved = out / "dimred_plots" / f"{name}.png"
        assert saved.read_bytes()[:8] == PNG
        # the last image logged is the file saved at the end of training
        assert (run_dir / "files" / images[-1]["path"]).read_bytes() == saved.read_bytes()
