"""SNFS (sparse momentum) and MEST against hand-worked updates, written out from the papers' and the
reference code's rules, and their bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dimred_dist as dd
from dimred_dist import DimRedManager
from dimred_dist.core.rng import random_uint32
from dimred_dist.methods.snfs import redistribute


def _two_layers(wa, wb) -> nn.Module:
    m = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor(wa).reshape(2, 3))
        m[1].weight.copy_(torch.tensor(wb).reshape(2, 3))
    return m


def _set_masks(mgr, masks: dict[str, list[bool]]) -> None:
    for name, keep in masks.items():
        mgr.state[name].set_masks(torch.tensor(keep), torch.tensor(keep))


# ---- SNFS ---------------------------------------------------------------------------------------
ACTIVE3 = [True, True, True, False, False, False]
# Step 1 and step 2 gradients; with beta 0.5 the momentum at step 2 is m = 0.5 g1 + g2:
# layer 0: m = [3, 3, 3, 1, 5, 2]    (g2 alone would regrow flats 1, 2, 5)
# layer 1: m = [1, -1, 1, .5, -4, 0]  (g2 alone would regrow flat 1)
G1 = {"0.weight": [0, 0, 0, 0, 8, 0], "1.weight": [0, 0, 0, 0, -6, 0]}
G2 = {"0.weight": [3, 3, 3, 1, 1, 2], "1.weight": [1, -1, 1, 0.5, -1, 0]}


def _snfs(**args) -> tuple[DimRedManager, nn.Module, torch.optim.Optimizer]:
    r = dd.load_recipe({"method": "snfs", "sparsity": 0.5, "distribution": "uniform", "seed": 1,
                        "schedule": {"kind": "periodic", "interval": 2, "drop_fraction": 0.5, "decay": "constant",
                                     "end_fraction": 1.0, "skip_step": False},
                        "args": {"momentum": 0.5, **args}})
    model = _two_layers([6, 5, 4, 0, 0, 0], [3, 2, 1, 0, 0, 0])
    mgr = DimRedManager(r, model, total_steps=8).prepare()
    _set_masks(mgr, {"0.weight": ACTIVE3, "1.weight": ACTIVE3})
    with torch.no_grad():  # the random initial topology zeroed some of them
        model[0].weight.copy_(torch.tensor([6.0, 5, 4, 0, 0, 0]).reshape(2, 3))
        model[1].weight.copy_(torch.tensor([3.0, 2, 1, 0, 0, 0]).reshape(2, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mgr.attach(opt)
    return mgr, model, opt


def _run_to_step_2(mgr, model, opt) -> None:
    for t in range(3):
        for i, name in enumerate(("0.weight", "1.weight")):
            g = {1: G1, 2: G2}.get(t, {name: [0.0] * 6})[name]
            model[i].weight.grad = torch.tensor(g, dtype=torch.float32).reshape(2, 3)
        opt.step()
        opt.zero_grad()


def test_snfs_hand_worked_update():
    """Update before step 2, p = 0.5: each layer removes ceil(0.5 * 3) = 2 smallest |w| (layer 0: 5, 4;
    layer 1: 2, 1), 4 in all. Mean |m| over the active entries before death: 3 and 1, shares 3/4 and 1/4:
    layer 0 regrows 3 (largest |m| among flats 1-5: flat 4 (5), then flats 1, 2 (3), which were just
    removed and keep their values), layer 1 regrows 1 (flat 4, |m| 4). New entries start at 0; the
    total density stays 0.5 but layer 0 now holds 4 and layer 1 holds 2."""
    mgr, model, opt = _snfs()
    _run_to_step_2(mgr, model, opt)
    assert mgr.state["0.weight"].keep.tolist() == [True, True, True, False, True, False]
    assert mgr.state["1.weight"].keep.tolist() == [True, False, False, False, True, False]
    assert model[0].weight.reshape(-1).tolist() == [6, 5, 4, 0, 0, 0]
    assert model[1].weight.reshape(-1).tolist() == [3, 0, 0, 0, 0, 0]
    assert mgr.method.m["0.weight"].tolist() == [3, 3, 3, 1, 5, 2]
    assert mgr.method.m["1.weight"].tolist() == [1, -1, 1, 0.5, -4, 0]
    h = mgr.topology_history
    assert [x["step"] for x in h] == [2.0] and h[0]["drop_fraction"] == 0.5
    assert h[0]["churn"] == pytest.approx(4 / 12), "0: flat 4 in; 1: flats 1, 2 out, flat 4 in"
    m = mgr.metrics()
    assert m["dimred/snfs/momentum_bytes"] == 4 * 12 == m["dimred/snfs/momentum_bytes_max"]


def test_snfs_without_redistribution_regrows_per_layer():
    """redistribution: none: each layer regrows the 2 it removed: layer 0 flats 4 and 1; layer 1 flats 4
    and then the lower of the tied |m| = 1 (flat 1 over flat 2)."""
    mgr, model, opt = _snfs(redistribution="none")
    _run_to_step_2(mgr, model, opt)
    assert mgr.state["0.weight"].keep.tolist() == [True, True, False, False, True, False]
    assert mgr.state["1.weight"].keep.tolist() == [True, True, False, False, True, False]


def test_redistribute_hand_worked():
    """Shares 0.9 / 0.1 of 10 with layer 0 capped at 5: the excess goes to layer 1 (5 / 5). Even shares of
    3: floors 1 / 1, the remainder to the first of the tied fractions (2 / 1)."""
    assert redistribute([0.9, 0.1], 10, [5, 100]) == [5, 5]
    assert redistribute([0.5, 0.5], 3, [10, 10]) == [2, 1]
    assert redistribute([0.25, 0.75], 4, [10, 10]) == [1, 3]
    assert redistribute([0.5, 0.5], 10, [2, 3]) == [2, 3], "all layers full: fewer than asked"


def test_snfs_momentum_survives_a_checkpoint_round_trip():
    mgr, model, opt = _snfs()
    _run_to_step_2(mgr, model, opt)
    ts = mgr.method.tensor_state()
    assert set(ts) == {"momentum"} and ts["momentum"]["0.weight"].dtype == torch.float32
    other, _, _ = _snfs()
    other.method.load_tensor_state({"momentum": {n: t.clone() for n, t in ts["momentum"].items()}})
    assert all(torch.equal(other.method.m[n], mgr.method.m[n]) for n in mgr.method.m)
    with pytest.raises(ValueError, match="expected momentum"):
        other.method.load_tensor_state({})


def test_snfs_bad_input():
    with pytest.raises(ValueError, match="redistribution must be 'momentum' or 'none', got 'variance'"):
        dd.load_recipe({"method": "snfs", "sparsity": 0.5, "args": {"redistribution": "variance"}})
    with pytest.raises(ValueError, match="momentum must be in"):
        dd.load_recipe({"method": "snfs", "sparsity": 0.5, "args": {"momentum": 1.5}})
    with pytest.raises(ValueError, match="snfs regrows on a periodic schedule"):
        DimRedManager(dd.load_recipe({"method": "snfs", "sparsity": 0.5, "schedule": {"kind": "cubic"}}),
                      _two_layers([1] * 6, [1] * 6), total_steps=8).prepare()


# ---- MEST ---------------------------------------------------------------------------------------
W = [0.9, -0.1, 0.3, 0.5, -0.7, 0.05, 0.2, -0.4, 0.6, 0.0]


def _mest(**args):
    model = nn.Linear(1, 10, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(W).reshape(10, 1))
    r = dd.load_recipe({"method": "mest", "sparsity": 0.5, "distribution": "uniform", "seed": 7,
                        "schedule": {"kind": "periodic", "interval": 2, "end_fraction": 1.0, "skip_step": False},
                        "args": {"mutation_ratios": [0.2, 0.1, 0.0], "decay_fractions": [0.5, 0.75], **args}})
    mgr = DimRedManager(r, model, total_steps=8).prepare()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mgr.attach(opt)
    return mgr, model, opt


def _grown(step: int, non_survivors: list[int], k: int) -> list[int]:
    keys = random_uint32(7, step, "weight", 0, 10, salt=1).tolist()
    return sorted(sorted(non_survivors, key=lambda i: (-keys[i], i))[:k])


def _step(model, opt, g=None) -> None:
    model.weight.grad = torch.tensor(g or [0.0] * 10).reshape(10, 1)
    opt.step()
    opt.zero_grad()


def test_mest_hand_worked_mutations():
    """Initial: the five largest |w| (flats 0 .9, 4 .7, 8 .6, 3 .5, 7 .4). Before step 2 (r = 0.2 of 10
    entries, not of the 5 active): remove int(0.2 * 10) = 2 smallest |w|, flats 7 and 3, regrow 2 at random
    among the other seven. Before step 4 (r = 0.1): remove 1; before step 6 (r = 0 from 0.75 * 8): nothing."""
    mgr, model, opt = _mest()
    keep0 = mgr.state["weight"].keep.tolist()
    assert [i for i, k in enumerate(keep0) if k] == [0, 3, 4, 7, 8]
    for _ in range(3):
        _step(model, opt)
    grown = _grown(2, [1, 2, 3, 5, 6, 7, 9], 2)
    after2 = sorted([0, 4, 8] + grown)
    assert [i for i, k in enumerate(mgr.state["weight"].keep.tolist()) if k] == after2
    w = [W[i] if i in (0, 4, 8) or i in (3, 7) and i in grown else 0.0 for i in range(10)]
    assert model.weight.reshape(-1).tolist() == pytest.approx(w), "new entries at 0, a regrown one keeps its value"
    for _ in range(2):
        _step(model, opt)
    # step 4: remove the smallest |w| among after2 (a new entry at 0 if any: the lower index survives a tie)
    order = sorted(after2, key=lambda i: (abs(w[i]), -i))
    survivors = sorted(order[1:])
    grown4 = _grown(4, [i for i in range(10) if i not in survivors], 1)
    assert [i for i, k in enumerate(mgr.state["weight"].keep.tolist()) if k] == sorted(survivors + grown4)
    for _ in range(4):
        _step(model, opt)
    h = mgr.topology_history
    assert [x["step"] for x in h] == [2.0, 4.0], "r = 0 from step 6: no mutation"
    assert [x["drop_fraction"] for x in h] == [0.2, 0.1]


def test_mest_removal_score_with_gradient_weight():
    """grad_weight 1: scores |w| + |g| at step 2 with g = 0.5 at flat 7: active scores 0: .9, 3: .5, 4: .7,
    7: .9, 8: .6, so flats 3 and 8 are removed instead of 3 and 7."""
    mgr, model, opt = _mest(grad_weight=1.0)
    for t in range(3):
        _step(model, opt, [0.0] * 7 + [0.5, 0.0, 0.0] if t == 2 else None)
    keep = mgr.state["weight"].keep.tolist()
    assert keep[0] and keep[4] and keep[7]
    grown = _grown(2, [1, 2, 3, 5, 6, 8, 9], 2)
    assert [i for i, k in enumerate(keep) if k] == sorted([0, 4, 7] + grown)


def test_mest_bad_input():
    with pytest.raises(ValueError, match=r"decay_fractions must be 2 increasing fractions"):
        dd.load_recipe({"method": "mest", "sparsity": 0.5, "args": {"decay_fractions": [0.75, 0.5]}})
    with pytest.raises(ValueError, match=r"mutation_ratios must be a non-empty list"):
        dd.load_recipe({"method": "mest", "sparsity": 0.5, "args": {"mutation_ratios": [1.5]}})
    with pytest.raises(ValueError, match="grad_weight must be a number >= 0, got -1"):
        dd.load_recipe({"method": "mest", "sparsity": 0.5, "args": {"grad_weight": -1}})
