"""Top-KAST against a hand-worked run (the sets, the hidden entries, the penalty's gradient), and its
bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dimred_dist as dd
from dimred_dist import DimRedManager

# |w| order: 4 (0), 3 (1), 2 (2), 1.5 (7), 1 (3), 0.5 (4), 0.25 (5), 0.125 (6)
W0 = [4.0, -3.0, 2.0, -1.0, 0.5, 0.25, -0.125, 1.5]


def _recipe(**args) -> dd.Recipe:
    return dd.load_recipe({"method": "topkast", "sparsity": 0.75, "distribution": "uniform", "seed": 0,
                           "args": {"backward_sparsity": 0.5, "interval": 2, "penalty": 0.25, **args}})


def _topkast(**args):
    r = _recipe(**args)
    model = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(W0).reshape(2, 4))
    mgr = DimRedManager(r, model, total_steps=6).prepare()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mgr.attach(opt)
    return mgr, model, opt


def _step(model, opt, grad) -> None:
    model.weight.grad = torch.tensor(grad).reshape(2, 4)
    opt.step()
    opt.zero_grad()


def _w(model) -> list[float]:
    return model.weight.detach().reshape(-1).tolist()


def test_topkast_hand_worked_run():
    """D = 0.25 (2 of 8 forward), D + M = 0.5 (4 of 8 backward), SGD lr 0.5, penalty 0.25: the gradient
    gains 0.25 w on A and 0.25 w / 0.25 = w on B \\ A.

    Before step 0: A = {0, 1}, B = A + {2, 7}; the weights hold A only, the store all of w.
    Step 0, g = [1, 1, -2, 2, 8, 8, 8, 1]: w0 = 4 - 0.5 (1 + 1) = 3, w1 = -3 - 0.5 (1 - 0.75) = -3.125,
    w2 = 2 - 0.5 (-2 + 2) = 2, w7 = 1.5 - 0.5 (1 + 1.5) = 0.25; entries outside B do not move.
    Step 1, g = -8 at flat 2 only: w0 = 3 - 0.5 * 0.75 = 2.625, w1 = -3.125 + 0.5 * 0.78125 = -2.734375,
    w2 = 2 - 0.5 (-8 + 2) = 5, w7 = 0.25 - 0.5 * 0.25 = 0.125.
    Before step 2 the sets are recomputed from |θ| = [2.625, 2.734375, 5, 1, 0.5, 0.25, 0.125, 0.125]:
    B = {2, 1, 0, 3} (flat 3 enters from the store, flat 7 leaves with its value), A = {2, 1}.
    Step 2, g = 0: w2 = 5 - 0.5 * 1.25 = 4.375, w1 = -2.734375 * 0.875 = -2.392578125, and on B \\ A
    (flats 0, 3) w <- w - 0.5 w: 1.3125, -0.5.
    """
    mgr, model, opt = _topkast()
    m = mgr.method
    assert m.forward["weight"].tolist() == [True, True, False, False, False, False, False, False]
    assert mgr.state["weight"].keep.tolist() == [True, True, True, False, False, False, False, True]
    assert _w(model) == [4, -3, 0, 0, 0, 0, 0, 0], "the forward pass sees A only"
    assert m.theta["weight"].tolist() == W0

    _step(model, opt, [1.0, 1, -2, 2, 8, 8, 8, 1])
    assert _w(model) == [3, -3.125, 0, 0, 0, 0, 0, 0]
    assert m.theta["weight"].tolist()[2:] == [2, -1, 0.5, 0.25, -0.125, 0.25]
    assert mgr.topology_history == []

    _step(model, opt, [0.0, 0, -8, 0, 0, 0, 0, 0])
    assert _w(model) == [2.625, -2.734375, 0, 0, 0, 0, 0, 0]
    assert m.theta["weight"].tolist()[2:] == [5, -1, 0.5, 0.25, -0.125, 0.125]

    _step(model, opt, [0.0] * 8)
    assert mgr.state["weight"].keep.tolist() == [True, True, True, True, False, False, False, False]
    assert m.forward["weight"].tolist() == [False, True, True, False, False, False, False, False]
    assert _w(model) == [0, -2.392578125, 4.375, 0, 0, 0, 0, 0]
    assert m.theta["weight"].tolist() == [1.3125, -2.734375, 5, -0.5, 0.5, 0.25, -0.125, 0.125], \
        "the store keeps B \\ A (new values) and the entries outside B (flat 7 left with 0.125)"
    (h,) = mgr.topology_history
    assert h["step"] == 2.0 and h["churn"] == pytest.approx(2 / 8), "flat 3 in, flat 7 out of B"
    assert h["topkast/forward_churn"] == pytest.approx(2 / 8) and h["topkast/forward_density"] == 0.25
    assert mgr.method.metrics()["dimred/topkast/state_bytes"] == 5 * 8


def test_topkast_forward_uses_the_forward_set_only():
    """The model's output is x @ (w * A)^T between steps: B \\ A entries contribute nothing."""
    mgr, model, opt = _topkast(penalty=0.0)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    _step(model, opt, [0.5] * 8)
    full = torch.tensor(W0) - 0.25 * torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 1])
    fwd = mgr.method.forward["weight"].float()
    assert torch.equal(model(x), x @ (full * fwd).reshape(2, 4).T)
    assert mgr.method.theta["weight"][2] == 1.75 and mgr.method.theta["weight"][7] == 1.25


def test_topkast_moments_of_entries_entering_the_backward_set_restart():
    """With Adam the entry that enters B (flat 3 before step 2) starts with zero moments."""
    r = _recipe(penalty=0.0)
    model = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(W0).reshape(2, 4))
    mgr = DimRedManager(r, model, total_steps=4).prepare()
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    mgr.attach(opt)
    _step(model, opt, [1.0, 1, 1, 1, 1, 1, 1, 1])
    _step(model, opt, [0.0, 0, -8, 0, 0, 0, 0, 0])
    _step(model, opt, [0.0, 0, 0, 0, 0, 0, 0, 0])
    keep = mgr.state["weight"].keep
    st = opt.state[model.weight]
    assert keep.tolist()[:4] == [True, True, True, True] and not keep[7]
    # flat 3 had nonzero gradients at steps 0 and 1 (masked: it was outside B), so its moments are 0
    assert st["exp_avg"].reshape(-1)[3] == 0 and st["exp_avg_sq"].reshape(-1)[3] == 0


@pytest.mark.parametrize(("args", "sparsity", "message"), [
    ({"backward_sparsity": 0.95}, 0.9, "backward_sparsity 0.95 is above the recipe's sparsity 0.9"),
    ({"interval": 0}, 0.9, "interval must be an integer >= 1, got 0"),
    ({"penalty": -1.0}, 0.9, "penalty must be a number >= 0"),
    ({"backward_sparsity": 1.0}, 0.9, "backward_sparsity must be a fraction in [0, 1)"),
])
def test_topkast_bad_input(args, sparsity, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        dd.load_recipe({"method": "topkast", "sparsity": sparsity, "args": args})


def test_topkast_refuses_a_schedule():
    r = dd.load_recipe({"method": "topkast", "sparsity": 0.5, "schedule": {"kind": "periodic", "interval": 2}})
    with pytest.raises(ValueError, match="topkast recomputes its sets every `args.interval` steps"):
        DimRedManager(r, nn.Linear(4, 2), total_steps=4).prepare()


def test_topkast_default_backward_sparsity_is_ten_points_below():
    r = dd.load_recipe({"method": "topkast", "sparsity": 0.9})
    from dimred_dist.methods.topkast import backward_sparsity

    assert backward_sparsity(r) == pytest.approx(0.8)
    assert backward_sparsity(dd.load_recipe({"method": "topkast", "sparsity": 0.05})) == 0.0


def test_topkast_resumes_bit_for_bit(tmp_path):
    """Saved after step 3 (between recomputations, B \\ A hidden in the store) and resumed in a fresh
    manager: steps 3-5, with the recomputation before step 4, equal an uninterrupted run."""
    from dimred_dist.distributed.checkpoint import load_dimred_state, save_dimred_state

    grads = [[float((3 * t + i) % 7 - 3) for i in range(8)] for t in range(6)]
    mgr, model, opt = _topkast()
    for t in range(3):
        _step(model, opt, grads[t])
    save_dimred_state(mgr, tmp_path / "ckpt")
    saved = model.weight.detach().clone()
    for t in range(3, 6):
        _step(model, opt, grads[t])

    r = _recipe()
    model2 = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        model2.weight.copy_(saved)
    mgr2 = DimRedManager(r, model2, total_steps=6).prepare(resuming=True)
    load_dimred_state(mgr2, tmp_path / "ckpt")
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5)
    mgr2.attach(opt2)
    for t in range(3, 6):
        _step(model2, opt2, grads[t])
    assert torch.equal(model2.weight, model.weight)
    assert torch.equal(mgr2.method.theta["weight"], mgr.method.theta["weight"])
    assert torch.equal(mgr2.method.forward["weight"], mgr.method.forward["weight"])
    assert torch.equal(mgr2.state["weight"].keep, mgr.state["weight"].keep)
    assert mgr2.method.metrics() == mgr.method.metrics()
    assert mgr2.topology_history[-1]["step"] == 4.0
