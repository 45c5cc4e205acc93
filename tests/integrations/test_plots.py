"""Plots from the metrics dict: valid PNGs, layers in model order, FREEZE shown; optional imports stay optional."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dimred_dist import DimRedManager
from dimred_dist.integrations import wandb as dimred_wandb
from dimred_dist.integrations.plots import churn_figure, density_figure, layer_fractions, save_plots
from tests.models import mixed, mlp, recipe

PIL = pytest.importorskip("PIL.Image")


def _png_size(path) -> tuple[int, int]:
    with PIL.open(path) as im:
        im.verify()  # raises on a truncated or corrupt file
    with PIL.open(path) as im:
        return im.size


def test_layer_fractions_in_model_order_with_freeze():
    model = mixed()
    mgr = DimRedManager(recipe("random_freeze", 0.6, "erk"), model).prepare()
    rows = layer_fractions(mgr.metrics())
    assert [r[0] for r in rows] == list(mgr.views)  # model order, not sorted by name
    for name, train, freeze, prune in rows:
        assert train + freeze + prune == pytest.approx(1.0)
        assert prune == 0.0 and train == pytest.approx(mgr.ctx.keep_counts[name] / mgr.views[name].numel)


def test_save_plots_writes_readable_pngs(tmp_path):
    model = mlp()
    mgr = DimRedManager(recipe("set", 0.8, "erk", update_interval=1), model, total_steps=6).prepare()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr.attach(opt)
    for _ in range(6):
        model(torch.randn(4, 12)).sum().backward()
        opt.step()
        opt.zero_grad()
    paths = save_plots(mgr.metrics(), mgr.topology_history, tmp_path / "plots", title="step 6")
    assert set(paths) == {"layer_density", "churn"}
    for p in paths.values():
        w, h = _png_size(p)
        assert w >= 600 and h >= 300


def test_density_chart_grows_with_the_number_of_layers(tmp_path):
    small = density_figure(DimRedManager(recipe("random", 0.5), mlp()).prepare().metrics())
    big = density_figure(DimRedManager(recipe("random", 0.5), mixed()).prepare().metrics())
    assert big.get_figheight() > small.get_figheight()
    with pytest.raises(ValueError, match="nothing to plot"):
        density_figure({"dimred/density": 0.5})


def test_no_churn_plot_without_updates(tmp_path):
    assert churn_figure([]) is None
    paths = save_plots(DimRedManager(recipe("magnitude", 0.5), mlp()).prepare().metrics(), [], tmp_path)
    assert set(paths) == {"layer_density"}


def test_log_images_without_a_run_is_a_no_op(tmp_path):
    if dimred_wandb.active_run() is not None:
        pytest.skip("a W&B run is active in this test process")
    assert dimred_wandb.log_images({"layer_density": tmp_path / "missing.png"}) is False


def test_top_level_import_pulls_in_no_tracker_or_plotting_library():
    names = "('wandb', 'matplotlib', 'transformers')"
    code = f"import sys, dimred_dist; print(sorted(m for m in {names} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
