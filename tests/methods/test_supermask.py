"""Edge-popup supermasks against a hand-worked run (score steps, top-k, frozen weights), resume, and
bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import dimred_dist as dd
from dimred_dist import DimRedManager
from dimred_dist.core.rng import random_uniform

W0 = [1.0, 2.0, -1.0, 4.0]


def _recipe(**args) -> dd.Recipe:
    return dd.load_recipe({"method": "edge_popup", "sparsity": 0.5, "distribution": "uniform", "seed": 4,
                           "args": {"score_lr": 0.5, "lr_decay": "constant", "momentum": 0.5, "weight_decay": 0.0,
                                    **args}})


def _edge_popup(**args):
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(W0).reshape(2, 2))
    mgr = DimRedManager(_recipe(**args), model, total_steps=4).prepare()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    mgr.attach(opt)
    return mgr, model, opt


def _set(mgr, model, scores, keep) -> None:
    mgr.method.scores["weight"].copy_(torch.tensor(scores))
    mgr.state["weight"].set_keep(torch.tensor(keep), train_new=False)
    with torch.no_grad():
        model.weight.copy_((torch.tensor(W0) * torch.tensor(keep)).reshape(2, 2))


def _step(model, opt, grad) -> None:
    model.weight.grad = torch.tensor(grad).reshape(2, 2)
    opt.step()
    opt.zero_grad()


def _w(model) -> list[float]:
    return model.weight.detach().reshape(-1).tolist()


def test_initial_scores_are_kaiming_uniform_from_the_seed_and_every_kept_weight_freezes():
    mgr, model, _ = _edge_popup()
    u = random_uniform(4, 0, "weight", 0, 4, salt=7)
    expected = ((2 * u - 1) / math.sqrt(2)).float()
    s = mgr.method.scores["weight"]
    assert torch.equal(s, expected)
    keep = mgr.state["weight"].keep
    top2 = set(torch.argsort(-s.abs(), stable=True)[:2].tolist())
    assert set(torch.nonzero(keep).flatten().tolist()) == top2
    assert not bool(mgr.state["weight"].train.any()), "no managed entry trains"
    assert _w(model) == [W0[i] if keep[i] else 0.0 for i in range(4)]
    assert mgr.method.w0["weight"].tolist() == W0


def test_edge_popup_hand_worked_run():
    """lr 0.5, momentum 0.5, no decay; s = [0.5, -0.375, 0.25, 0.125], kept {0, 1}.

    Step 0, g = [0.5, 0.125, 0.25, -0.25]: the score gradient g * w0 * sign(s) is
    [0.5, -0.25, -0.25, -1], so s = [0.25, -0.25, 0.375, 0.625]; top-2 of |s| = {3, 2}: the weights
    become [0, 0, -1, 4] (w0 comes back on entries that enter).
    Step 1, g = 0: the momentum [0.25, -0.125, -0.125, -0.5] alone moves s to
    [0.125, -0.1875, 0.4375, 0.875]; the top-2 stays {3, 2}, no topology update is logged.
    The SGD step on the weights (lr 1, nonzero gradients) never moves them: they FREEZE.
    """
    mgr, model, opt = _edge_popup()
    _set(mgr, model, [0.5, -0.375, 0.25, 0.125], [True, True, False, False])
    n_updates = len(mgr.topology_history)

    _step(model, opt, [0.5, 0.125, 0.25, -0.25])
    assert mgr.method.scores["weight"].tolist() == [0.25, -0.25, 0.375, 0.625]
    assert mgr.state["weight"].keep.tolist() == [False, False, True, True]
    assert not bool(mgr.state["weight"].train.any())
    assert _w(model) == [0, 0, -1, 4]
    assert mgr.topology_history[-1]["churn"] == 1.0 and len(mgr.topology_history) == n_updates + 1

    _step(model, opt, [0.0, 0.0, 0.0, 0.0])
    assert mgr.method.scores["weight"].tolist() == [0.125, -0.1875, 0.4375, 0.875]
    assert mgr.method.buf["weight"].tolist() == [0.25, -0.125, -0.125, -0.5]
    assert _w(model) == [0, 0, -1, 4]
    assert len(mgr.topology_history) == n_updates + 1, "an unchanged top-k is no update"
    assert mgr.metrics()["dimred/edge_popup/state_bytes"] == 12 * 4


def test_weight_decay_and_cosine_decay_of_the_score_lr():
    """wd 0.5, momentum 0, cosine over 4 steps: lr at step 1 = 0.5 * 0.5 * (1 + cos(pi / 4))."""
    mgr, model, opt = _edge_popup(weight_decay=0.5, momentum=0.0, lr_decay="cosine")
    _set(mgr, model, [0.5, -0.375, 0.25, 0.125], [True, True, False, False])
    _step(model, opt, [0.0] * 4)  # step 0: lr 0.5, s -= 0.5 * 0.5 s
    assert mgr.method.scores["weight"].tolist() == [0.375, -0.28125, 0.1875, 0.09375]
    lr1 = 0.25 * (1 + math.cos(math.pi / 4))
    assert mgr.method.score_lr(1, 4) == lr1
    _step(model, opt, [0.0] * 4)
    expected = torch.tensor([0.375, -0.28125, 0.1875, 0.09375]) * (1 - lr1 * 0.5)
    assert torch.allclose(mgr.method.scores["weight"], expected, rtol=1e-6, atol=0)
    assert mgr.metrics()["dimred/edge_popup/score_lr"] == lr1


def test_edge_popup_resumes_bit_for_bit(tmp_path):
    from dimred_dist.distributed.checkpoint import load_dimred_state, save_dimred_state

    grads = [[float((5 * t + i) % 7 - 3) / 4 for i in range(4)] for t in range(4)]
    mgr, model, opt = _edge_popup()
    for t in range(2):
        _step(model, opt, grads[t])
    save_dimred_state(mgr, tmp_path / "ckpt")
    saved = model.weight.detach().clone()
    for t in range(2, 4):
        _step(model, opt, grads[t])
    model2 = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model2.weight.copy_(saved)
    mgr2 = DimRedManager(_recipe(), model2, total_steps=4).prepare(resuming=True)
    load_dimred_state(mgr2, tmp_path / "ckpt")
    opt2 = torch.optim.SGD(model2.parameters(), lr=1.0)
    mgr2.attach(opt2)
    for t in range(2, 4):
        _step(model2, opt2, grads[t])
    assert torch.equal(model2.weight, model.weight)
    for key in ("scores", "buf", "w0"):
        assert torch.equal(getattr(mgr2.method, key)["weight"], getattr(mgr.method, key)["weight"]), key
    assert torch.equal(mgr2.state["weight"].keep, mgr.state["weight"].keep)


@pytest.mark.parametrize(("recipe", "message"), [
    ({"sparsity": 0.0}, "edge_popup chooses a subnetwork of the frozen weights: give a sparsity above 0"),
    ({"args": {"score_lr": 0.0}}, "score_lr must be > 0"),
    ({"args": {"momentum": -0.1}}, "momentum must be a number >= 0, got -0.1"),
    ({"args": {"lr_decay": "step"}}, "lr_decay must be 'cosine' or 'constant', got 'step'"),
    ({"args": {"interval": 0}}, "interval must be an integer >= 1, got 0"),
])
def test_edge_popup_bad_input(recipe, message):
    with pytest.raises(ValueError, match=message):
        dd.load_recipe({"method": "edge_popup", "sparsity": 0.5, **recipe})
