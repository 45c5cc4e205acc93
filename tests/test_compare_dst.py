"""Smoke test of the fidelity script (scripts/compare_dst.py --quick): every record, a plausible table."""

from __future__ import annotations

import json
import sys

import pytest

from tests.launch import REPO

sys.path.insert(0, str(REPO / "scripts"))
import compare_dst  # noqa: E402


@pytest.mark.skipif(not (compare_dst.FORTUNES / "art").is_file(), reason="Debian's fortunes corpus is not installed")
def test_quick_run_writes_every_record(tmp_path, capsys):
    out = tmp_path / "dst.json"
    methods = ["dense", "static", "snfs", "mest", "granet", "topkast"]
    assert compare_dst.main(["--quick", "--steps", "20", "--json", str(out), "--methods", ",".join(methods)]) == 0
    records = json.loads(out.read_text())
    assert {(r["method"], r["sparsity"]) for r in records} == {("dense", 0.0)} | {
        (m, s) for m in methods[1:] for s in (0.8, 0.9)}
    keys = {"method", "sparsity", "seed", "val_ppl", "itop", "train_fraction", "seconds"}
    assert all(set(r) == keys and 1.0 < r["val_ppl"] < 257.0 for r in records), records
    by = {(r["method"], r["sparsity"]): r for r in records}
    assert by[("static", 0.9)]["itop"] == pytest.approx(0.1, abs=1e-3), "a static topology: ITOP = density"
    assert by[("snfs", 0.9)]["itop"] > 0.1, "SNFS regrows: more entries were active at some point"
    assert by[("topkast", 0.9)]["itop"] > 0.2, "Top-KAST recomputes its sets: entries entered the backward set"
    assert by[("dense", 0.0)]["itop"] == 1.0 and by[("granet", 0.8)]["itop"] == 1.0, "GraNet starts dense"
    table = capsys.readouterr().out
    assert "| method | ppl 80% | ITOP 80% | ppl 90% | ITOP 90% |" in table and "| mest |" in table
