"""The initial topology of SET / RigL: random (from scratch) or magnitude (fine-tuning)."""

from __future__ import annotations

import pytest
import torch

import dimred_dist as dd


def _model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_magnitude_init_keeps_the_largest_pretrained_weights(method):
    model = _model()
    before = {n: p.detach().clone().reshape(-1) for n, p in model.named_parameters()}
    recipe = dd.load_recipe({"method": method, "sparsity": 0.75, "distribution": "uniform", "args": {"init": "magnitude"}})
    mgr = dd.DimRedManager(recipe, model, total_steps=10).prepare()
    for name, ps in ((ps.name, ps) for ps in mgr.state):
        w = before[name].abs()
        expected = torch.zeros_like(ps.keep)
        expected[torch.sort(w, descending=True, stable=True).indices[: int(ps.keep.sum())]] = True
        assert torch.equal(ps.keep, expected)
        assert int(ps.keep.sum()) == round(0.25 * w.numel())


def test_random_init_differs_from_magnitude_and_bad_init_is_rejected():
    a = dd.DimRedManager(dd.load_recipe({"method": "rigl", "sparsity": 0.75}), _model(), total_steps=10).prepare()
    b = dd.DimRedManager(
        dd.load_recipe({"method": "rigl", "sparsity": 0.75, "args": {"init": "magnitude"}}), _model(), total_steps=10
    ).prepare()
    assert not torch.equal(a.state["0.weight"].keep, b.state["0.weight"].keep)
    with pytest.raises(ValueError, match="init must be"):
        dd.load_recipe({"method": "rigl", "sparsity": 0.5, "args": {"init": "snip"}})
