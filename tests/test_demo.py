"""End to end: scripts/train_lm.py as 2 real processes (gloo DDP on CPU) on a tiny configuration.

Checks the run's outputs against what the recipe demands, recomputed here: every pruned entry of
the final weights is exactly 0.0 and every layer keeps exactly round(ERK density * numel) entries.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dimred_dist
from dimred_dist.core.distributions import keep_counts, layer_densities

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs" / "static_erk_random_90.yaml"
FORTUNES = Path("/usr/share/games/fortunes/computers")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    if not FORTUNES.is_file():
        pytest.skip("Debian's fortunes corpus is missing; scripts/setup_env.sh installs it")
    out = tmp_path_factory.mktemp("train_lm")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "scripts/train_lm.py",
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--log-every",
        "3",
        "--val-blocks",
        "16",
        "--sample-tokens",
        "0",
        "--recipe",
        str(RECIPE),
        "--output-dir",
        str(out),
    ]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (
        f"train_lm.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return out


def _expected_keep(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    recipe = dimred_dist.load_recipe(RECIPE)
    return keep_counts(layer_densities(recipe.distribution, shapes, recipe.density), shapes)


@pytest.mark.distributed
def test_summary_reports_exact_sparsity(demo_run: Path) -> None:
    s = json.loads((demo_run / "summary.json").read_text())
    assert s["steps"] == 6 and s["world_size"] == 2
    assert [h[0] for h in s["loss_history"]] == [3, 6]
    assert all(math.isfinite(h[1]) for h in s["loss_history"]) and math.isfinite(s["final_val_loss"])
    assert s["weights_identical_across_ranks"] and s["masks_identical_across_ranks"]
    assert s["max_abs_pruned"] == 0.0
    layers = s["layers"]
    expected = _expected_keep({n: tuple(r["shape"]) for n, r in layers.items()})
    assert set(layers) == set(expected)
    for name, r in layers.items():
        assert r["kept"] == r["target_kept"] == expected[name], name
        assert r["density"] == expected[name] / r["numel"], name
        assert r["max_abs_pruned"] == 0.0, name
    total = sum(r["numel"] for r in layers.values())
    assert abs(sum(expected.values()) - 0.1 * total) <= len(layers)  # rounding only


@pytest.mark.distributed
def test_saved_weights_are_zero_where_pruned(demo_run: Path) -> None:
    weights = torch.load(demo_run / "model.pt", weights_only=True)
    masks = torch.load(demo_run / "dimred_state.pt", weights_only=True)
    assert masks["step"] == 6
    keeps = {k[: -len(".keep")]: v for k, v in masks["masks"].items() if k.endswith(".keep")}
    assert "transformer.wte.weight" in keeps  # the tied embedding / lm_head is managed (once)
    expected = _expected_keep({n: tuple(weights[n].shape) for n in keeps})
    for name, keep in keeps.items():
        w = weights[name].reshape(-1)
        assert int(keep.sum()) == expected[name], name
        assert torch.count_nonzero(w[~keep]) == 0, name
        assert torch.count_nonzero(w[keep]) > 0.99 * expected[name], name  # kept entries were not zeroed
    assert torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])
