"""scripts/demo_report.py on two summaries written by hand: the table and the per-run line against dense."""

from __future__ import annotations

import json
import sys

from tests.launch import REPO

sys.path.insert(0, str(REPO / "scripts"))
import demo_report  # noqa: E402


def _summary(path, sparsity, acc, rank_bytes, trainable, freeze=0.0):
    path.mkdir()
    m = {"dimred/optimizer/state_bytes": 2 * rank_bytes, "dimred/optimizer/rank_state_bytes": rank_bytes,
         "dimred/fraction/freeze": freeze, "dimred/fraction/train": 1 - freeze}
    (path / "dimred_summary.json").write_text(json.dumps({
        "recipe": {"method": "spiel" if sparsity else "random", "sparsity": sparsity}, "metrics": m,
        "eval_accuracy": acc, "eval_loss": 1.0, "train_seconds": 10.0, "max_abs_pruned": 0.0,
        "trainable_entries": trainable, "model_entries": 1000}))


def test_report_leads_with_the_largest_rank(tmp_path, capsys):
    _summary(tmp_path / "dense", 0.0, 0.70, 8 * 2**20, 1000)
    _summary(tmp_path / "sft", 0.95, 0.69, 2**20, 50, freeze=0.95)
    demo_report.main([str(tmp_path / "dense"), str(tmp_path / "sft")])
    out = capsys.readouterr().out
    assert "spiel 95% frozen" in out and "   dense" in out
    assert ("sft: trains 5.0% of the model's entries; val acc -1.0 points against dense; optimizer state of the "
            "largest rank 1.0 MiB instead of 8.0 MiB (7.0 MiB saved, 0.12x)") in out
