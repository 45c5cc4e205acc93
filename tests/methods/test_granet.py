"""GraNet: a hand-worked run (global pruning plus same-step drop/regrow, ceil rounding, zero init,
regrowth after the pruning phase) and bad input."""

from __future__ import annotations

import pytest
import torch

import dimred_dist as dd
from dimred_dist import DimRedManager
from tests.methods.test_pai import _linear

# Weights [6, 5, 4, 3, 2, 1] (flat), SGD at lr 0 so only the topology changes them.
W = [[6.0, 5.0, 4.0], [3.0, 2.0, 1.0]]
GRADS = {2: [[0.0, 0.0, 0.0], [0.0, 9.0, 1.0]], 4: [[0.0, 0.0, 0.0], [7.0, 0.0, 2.0]]}


def _recipe(**args) -> dd.Recipe:
    return dd.load_recipe({"method": "granet", "sparsity": 0.5, "distribution": "global",
                           "schedule": {"kind": "cubic", "interval": 2, "end_fraction": 0.25},
                           "args": {"swap_fraction": 0.2, "min_swap_fraction": 0.0, **args}})


def test_granet_hand_worked():
    """T = 8, t_end = 2. Step 2: prune to 3 of 6 by |w| (keep 6, 5, 4); p = 0.2 (1 + cos(pi/4)) / 2 = 0.171,
    ceil(0.171 * 3) = 1 (RigL's int() would drop none): drop 4, regrow the largest |g| among the other
    four, g = 9 at flat 4, at 0. Step 4 (after the pruning phase): p = 0.1, drop the smallest |w| (the
    regrown 0 at flat 4), regrow flat 3 (|g| 7)."""
    model = _linear(W)
    mgr = DimRedManager(_recipe(), model, total_steps=8).prepare()
    assert bool(mgr.state["weight"].keep.all()), "dense-to-sparse: dense at first"
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mgr.attach(opt)
    masks = {}
    for t in range(5):
        model.weight.grad = torch.tensor(GRADS.get(t, [[0.0] * 3] * 2))
        opt.step()
        opt.zero_grad()
        masks[t] = mgr.state["weight"].keep.reshape(2, 3).tolist()
    assert masks[2] == [[True, True, False], [False, True, False]]
    assert masks[4] == [[True, True, False], [True, False, False]]
    assert model.weight.tolist() == [[6.0, 5.0, 0.0], [0.0, 0.0, 0.0]]
    h = mgr.topology_history
    assert [x["step"] for x in h] == [2.0, 4.0]
    assert h[0]["target_density"] == 0.5 and h[0]["drop_fraction"] == pytest.approx(0.1 * (1 + 2**-0.5))
    assert h[0]["churn"] == 0.5, "dense before, flat 0, 1, 4 after: flat 2, 3, 5 changed (4 pruned, then regrown)"


def test_granet_bad_input():
    with pytest.raises(ValueError, match="granet prunes on a cubic schedule"):
        DimRedManager(dd.load_recipe({"method": "granet", "sparsity": 0.5, "schedule": {"kind": "periodic"}}),
                      _linear(W), total_steps=8).prepare()
    with pytest.raises(ValueError, match="min_swap_fraction 0.6 is above swap_fraction 0.5"):
        dd.load_recipe({"method": "granet", "sparsity": 0.5, "args": {"min_swap_fraction": 0.6}})
