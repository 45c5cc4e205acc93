"""SET and RigL update rules against hand-worked examples and an independent single-process reference.

The reference below is written from the papers / RigL's code, not from the package: per layer, drop
``int(f * n_active)`` active entries with the smallest |w|, regrow as many entries that are not
survivors with the largest |g| (RigL) or the largest counter-based random key (SET); among equal
scores the lower index is preferred (survives, is regrown); a regrown entry that was inactive before
starts at 0, one dropped and regrown in the same update keeps its value.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dimred_dist import DimRedManager
from dimred_dist.core.rng import random_uint32
from tests.models import recipe


def _ranked(scores: list[float], eligible: list[bool], k: int) -> set[int]:
    """The k eligible indices with the highest scores; among equal scores the lowest index wins."""
    order = sorted((i for i, e in enumerate(eligible) if e), key=lambda i: (-scores[i], i))
    return set(order[:k])


def reference_update(w, g, keep, frac, grow_scores, drop_scores=None):
    """One SET / RigL update of one layer in plain Python: (new keep mask, new connections, new weights)."""
    n = len(w)
    active = [i for i in range(n) if keep[i]]
    n_drop = int(frac * len(active))
    survivors = _ranked(drop_scores or [abs(x) for x in w], keep, len(active) - n_drop)
    grown = _ranked(grow_scores, [i not in survivors for i in range(n)], n_drop)
    new_keep = [i in survivors or i in grown for i in range(n)]
    fresh = [i in grown and not keep[i] for i in range(n)]
    new_w = [0.0 if (fresh[i] or not new_keep[i]) else w[i] for i in range(n)]
    return new_keep, fresh, new_w


def _one_layer_manager(method: str, w, keep, g=None, *, drop: float, interval: int = 1):
    """A manager over one bias-free Linear(1 -> len(w)) with the given weights, mask and gradient."""
    model = nn.Linear(1, len(w), bias=False)
    r = recipe(method, 0.5, "uniform", seed=3, update_interval=interval, drop_fraction=drop, decay="constant",
               end_fraction=1.0)
    mgr = DimRedManager(r, model, total_steps=100).prepare()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w).reshape(-1, 1))
    mgr.state["weight"].set_masks(torch.tensor(keep), torch.tensor(keep))
    if g is not None:
        model.weight.grad = torch.tensor(g).reshape(-1, 1)
    return mgr, model


# ---- hand-worked examples -------------------------------------------------------------------
W = [0.9, -0.1, 0.0, 0.5, -0.7, 0.0, 0.2, 0.0, 0.0, 0.0]
KEEP = [True, True, False, True, True, False, True, False, False, False]  # active: 0, 1, 3, 4, 6
G = [0.0, 5.0, 0.3, 0.0, 0.0, -2.0, 0.0, 0.01, -0.4, 1.0]


def test_rigl_hand_worked_update():
    """5 active, drop 0.5 -> int(2.5) = 2 (round() would give 2 as well; see the truncation test).

    Drop the two smallest |w| among active {0: .9, 1: .1, 3: .5, 4: .7, 6: .2}: entries 1 and 6.
    Regrow the two largest |g| among all non-survivors {1: 5, 2: .3, 5: 2, 6: 0, 7: .01, 8: .4, 9: 1}:
    entries 1 (just dropped: it stays, keeping its value) and 5 (new: starts at 0).
    """
    mgr, model = _one_layer_manager("rigl", W, KEEP, G, drop=0.5)
    metrics = mgr.method.update(mgr.ctx, 1)
    assert metrics is not None
    keep = mgr.state["weight"].keep.tolist()
    assert keep == [True, True, False, True, True, True, False, False, False, False]
    assert mgr.ctx.moment_resets["weight"].tolist() == [i == 5 for i in range(10)]  # only the new connection
    w = model.weight.detach().reshape(-1).tolist()
    assert w[1] == pytest.approx(-0.1) and w[5] == 0.0
    assert metrics["dimred/churn"] == pytest.approx(2 / 10)  # 6 left, 5 arrived
    assert mgr.ctx.skip_requested, "RigL applies no optimizer step on an update step"


def test_set_hand_worked_update():
    """SET drops the same two (1 and 6) and regrows the two largest counter-based random keys among the
    non-survivors; the expected entries are computed from those keys here by hand-written ranking."""
    mgr, _ = _one_layer_manager("set", W, KEEP, drop=0.5)
    mgr.method.update(mgr.ctx, 1)
    keys = random_uint32(3, 1, "weight", 0, 10, salt=1).tolist()
    non_survivors = [1, 2, 5, 6, 7, 8, 9]
    grown = sorted(non_survivors, key=lambda i: (-keys[i], i))[:2]
    expected = [i in (0, 3, 4) or i in grown for i in range(10)]
    assert mgr.state["weight"].keep.tolist() == expected


def test_drop_count_is_truncated():
    """RigL's code: int(n_active * drop_fraction). 10 active at 0.35 -> 3 dropped (round() would drop 4)."""
    w = [float(i + 1) for i in range(10)] + [0.0] * 10
    keep = [True] * 10 + [False] * 10
    g = [0.0] * 10 + [float(i + 1) for i in range(10)]
    mgr, _ = _one_layer_manager("rigl", w, keep, g, drop=0.35)
    mgr.method.update(mgr.ctx, 1)
    new = mgr.state["weight"].keep.tolist()
    assert new[:3] == [False] * 3 and all(new[3:10]), "the three smallest |w| are dropped"
    assert [i for i in range(10, 20) if new[i]] == [17, 18, 19], "the three largest |g| are regrown"


def test_mirror_rules_give_other_masks():
    """The reference agrees with the hand-worked example, and the mirror-image rules (regrow the smallest
    gradients, drop the largest weights) give other masks, so the tests above tell them apart."""
    def kept(result):
        return {i for i, k in enumerate(result[0]) if k}

    assert kept(reference_update(W, G, KEEP, 0.5, [abs(x) for x in G])) == {0, 1, 3, 4, 5}
    assert kept(reference_update(W, G, KEEP, 0.5, [-abs(x) for x in G])) != {0, 1, 3, 4, 5}
    assert kept(reference_update(W, G, KEEP, 0.5, [abs(x) for x in G], [-abs(x) for x in W])) != {0, 1, 3, 4, 5}


# ---- against the reference on random layers ---------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("method", ["set", "rigl"])
def test_update_matches_reference_on_random_layers(method, seed):
    gen = torch.Generator().manual_seed(seed)
    n = 37
    w = (torch.randn(n, generator=gen) * (torch.rand(n, generator=gen) > 0.2)).tolist()
    keep = (torch.rand(n, generator=gen) < 0.5).tolist()
    w = [x if k else 0.0 for x, k in zip(w, keep)]
    g = torch.randn(n, generator=gen).round(decimals=1).tolist()  # rounding makes ties
    frac = float(torch.rand(1, generator=gen)) * 0.9
    mgr, model = _one_layer_manager(method, w, keep, g, drop=frac)
    mgr.method.update(mgr.ctx, 4)
    grow = [abs(x) for x in g] if method == "rigl" else random_uint32(3, 4, "weight", 0, n, salt=1).tolist()
    exp_keep, exp_fresh, exp_w = reference_update(w, g, keep, frac, grow)
    assert mgr.state["weight"].keep.tolist() == exp_keep
    fresh = mgr.ctx.moment_resets.get("weight")
    assert (fresh.tolist() if fresh is not None else [False] * n) == exp_fresh
    mgr.apply_masks()
    assert model.weight.detach().reshape(-1).tolist() == pytest.approx(exp_w)
