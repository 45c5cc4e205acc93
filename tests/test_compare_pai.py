"""Smoke test of the fidelity script (scripts/compare_pai.py --quick): every record, a plausible table."""

from __future__ import annotations

import json
import sys

from tests.launch import REPO

sys.path.insert(0, str(REPO / "scripts"))
import compare_pai  # noqa: E402


def test_quick_run_writes_every_record(tmp_path, capsys):
    out = tmp_path / "pai.json"
    assert compare_pai.main(["--quick", "--json", str(out), "--methods", "dense,random,snip,synflow,imp"]) == 0
    records = json.loads(out.read_text())
    assert {(r["method"], r["sparsity"]) for r in records} == {("dense", 0.0)} | {
        (m, s) for m in ("random", "snip", "synflow", "imp") for s in (0.8, 0.98)}
    assert all(set(r) == {"method", "sparsity", "seed", "accuracy"} and 0.0 <= r["accuracy"] <= 1.0 for r in records)
    dense = next(r["accuracy"] for r in records if r["method"] == "dense")
    assert dense > 0.8, "the dense MLP learns the digits"
    table = capsys.readouterr().out
    assert "| method | 80% | 98% |" in table and "| imp |" in table
