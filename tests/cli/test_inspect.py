"""``dimred-inspect``: the per-layer table and density chart of a checkpoint, and its errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dimred_dist as dd
from dimred_dist.cli.inspect import main
from dimred_dist.distributed.checkpoint import save_dimred_state
from tests.distributed.checkpoint_cases import mlp, recipe, scribble


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    mgr = dd.DimRedManager(recipe(), mlp(), total_steps=20).prepare()
    scribble(mgr)  # FREEZE and PRUNE entries in every layer
    save_dimred_state(mgr, tmp_path / "checkpoint-7")
    return tmp_path / "checkpoint-7"


def _expected(mgr_masks: dict) -> dict:
    return {n: (int(t.sum()), int((k & ~t).sum()), int((~k).sum())) for n, (k, t) in mgr_masks.items()}


def test_table_and_png(checkpoint, capsys):
    assert main([str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "step 7, saved by 1 rank(s) at ZeRO stage 0; method rigl, sparsity 0.7" in out
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines()[2:] if ln and not ln.startswith("-")}
    mgr = dd.DimRedManager(recipe(), mlp(), total_steps=20).prepare()
    scribble(mgr)
    expected = _expected({n: (mgr.state[n].keep, mgr.state[n].train) for n in mgr.views})
    for name, (t, f, p) in expected.items():
        row = lines[name]
        assert row[1] == "x".join(map(str, mgr.views[name].shape))
        assert [int(x) for x in row[4:7]] == [t, f, p] and int(row[2]) == t + f + p
        assert float(row[3]) == pytest.approx((t + f) / (t + f + p), abs=1e-4)
        assert f > 0 and p > 0
    total = lines["total"]
    assert [int(x) for x in total[-3:]] == [sum(c[i] for c in expected.values()) for i in range(3)]
    png = checkpoint / "dimred_density.png"
    assert f"density chart: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_console_script_png_path_and_dimred_folder(checkpoint, tmp_path):
    exe = Path(sys.executable).parent / "dimred-inspect"
    if not exe.exists():
        pytest.skip("dimred-inspect is not installed in this environment (pip install -e .)")
    png = tmp_path / "charts" / "d.png"
    proc = subprocess.run([str(exe), str(checkpoint / "dimred"), "--png", str(png)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "total" in proc.stdout and png.is_file()
    assert not (checkpoint / "dimred_density.png").exists()


def test_errors(checkpoint, tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 1
    assert "checkpoint directory not found" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert main([str(tmp_path / "plain")]) == 1
    assert "is not a dimred checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    f = bad / "dimred" / "rank0.safetensors"
    f.write_bytes(f.read_bytes()[:-1] + b"\x7f")
    assert main([str(bad), "--no-png"]) == 1
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "rank0.safetensors" in err
    assert not (bad / "dimred_density.png").exists()


def _edit(key, value):
    def edit(folder: Path) -> None:
        path = folder / "dimred" / "manifest.json"
        raw = json.loads(path.read_text())
        raw[key] = value
        path.write_text(json.dumps(raw))
    return edit


@pytest.mark.parametrize("damage", [
    lambda f: (f / "dimred" / "manifest.json").write_text("[1, 2"),
    lambda f: (f / "dimred" / "manifest.json").write_text("[]"),
    _edit("files", "not a list"),
    _edit("params", {"0.weight": "x"}),
    _edit("world_size", None),
    _edit("files", [{"rank": 0}]),
    _edit("checkpoint_files", {"../../etc/passwd": {"sha256": "0", "bytes": 1}}),
    lambda f: (f / "dimred" / "rank0.safetensors").write_bytes(b"\xff" * 8),
], ids=["truncated JSON", "a list", "files a string", "shape a string", "no world size", "file without keys",
        "path outside the checkpoint", "not safetensors"])
def test_any_damaged_checkpoint_gives_one_line(checkpoint, damage, capsys):
    damage(checkpoint)
    assert main([str(checkpoint), "--no-png"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dimred-inspect: error:") and "\n" not in err and "Traceback" not in err, err
