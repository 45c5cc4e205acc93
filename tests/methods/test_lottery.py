"""Lottery tickets in a plain loop: IMP rounds with weight / LR rewinding, and early-bird tickets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dimred_dist as dd
from dimred_dist import DimRedManager
from dimred_dist.distributed.checkpoint import load_dimred_state, save_dimred_state
from tests.models import mlp

L, K = 5, 2  # steps per round, rewind step


def _imp(rewind: str = "weights", distribution: str = "uniform", sparsity: float = 0.875, **extra) -> dd.Recipe:
    return dd.load_recipe({"method": "imp", "sparsity": sparsity, "distribution": distribution, "seed": 0,
                           "schedule": {"kind": "imp", "rounds": 3, "round_steps": L, "rewind": rewind,
                                        "rewind_step": K, **extra}})


def _run(recipe: dd.Recipe, steps: int = 4 * L, total: int = 4 * L):
    """Train with AdamW and a LambdaLR; record per step the weights before it, the lr it used and the
    optimizer's step count after it."""
    model = mlp()
    mgr = DimRedManager(recipe, model, total_steps=total).prepare()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    mgr.attach(opt, lr_scheduler=sched)
    rec = {"w": [], "lr": [], "count": []}
    opt.register_step_pre_hook(lambda o, a, k: rec["lr"].append(o.param_groups[0]["lr"]))  # after the manager's
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
        rec["w"].append({n: p.detach().clone() for n, p in model.named_parameters()})
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        rec["count"].append(float(opt.state[model[0].weight]["step"]) if opt.state.get(model[0].weight) else 0.0)
    rec["final"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return mgr, model, rec


def test_imp_rounds_reach_their_densities_and_rewind_to_step_k():
    mgr, model, rec = _run(_imp())
    hist = mgr.topology_history
    assert [(h["step"], h["round"]) for h in hist] == [(5.0, 1.0), (10.0, 2.0), (15.0, 3.0)]
    sizes = {n: v.numel for n, v in mgr.views.items()}
    for r, h in enumerate(hist, start=1):
        assert h["target_density"] == pytest.approx(0.5 ** r)  # prune 1 - 0.125 ** (1/3) = 0.5 per round
    for n, ps in mgr.state.params.items():
        assert abs(int(ps.keep.sum()) - 0.125 * sizes[n]) <= 1, f"{n}: (1 - p) ** R of the entries, up to one"
    snap = rec["w"][K]  # the weights after K steps
    for t in (5, 10, 15):
        after = rec["w"][t + 1]  # the weights after the round-end step: rewound
        for n, w in after.items():
            keep = mgr.state[n].keep.view_as(w) if n in mgr.views else None
            if keep is None:  # unmanaged parameters (biases) are rewound too
                assert torch.equal(w, snap[n]), f"step {t}: {n} not rewound"
            else:
                kept_now = _mask_after_round(mgr, t, n, w.shape)
                assert torch.equal(w[kept_now], snap[n][kept_now]), f"step {t}: survivors of {n} not rewound exactly"
                assert bool((w[~kept_now] == 0).all()), f"step {t}: pruned entries of {n} not 0"
        assert rec["count"][t] == 0.0, "the round-end step applies no update and the optimizer restarts"
        assert rec["count"][t + 1] == 1.0
        assert rec["lr"][t + 1] == pytest.approx(rec["lr"][K]), "the next round starts at the LR of step k"
        assert rec["lr"][t + 2] == pytest.approx(rec["lr"][K + 1])
    assert rec["count"][4] == 5.0 and rec["lr"][4] == pytest.approx(0.05 / 5)


def _mask_after_round(mgr, t: int, name: str, shape) -> torch.Tensor:
    """The keep mask chosen at the round ending before step t (the final masks get sparser later, and a
    later round's mask is a subset of this one)."""
    return _MASKS[t][name].view(shape) if t in _MASKS else mgr.state[name].keep.view(shape)


_MASKS: dict = {}


@pytest.fixture(autouse=True)
def _record_masks(monkeypatch):
    """Record the keep masks right after every IMP round's pruning."""
    from dimred_dist.methods.base import Method

    orig = Method.prune_to
    _MASKS.clear()

    def prune_to(self, ctx, density):
        out = orig(self, ctx, density)
        _MASKS[_STEP[0]] = {n: ctx.state[n].keep.clone() for n in ctx.views}
        return out

    orig_update = Method.update

    def update(self, ctx, step):
        _STEP[0] = step
        return orig_update(self, ctx, step)

    monkeypatch.setattr(Method, "prune_to", prune_to)
    monkeypatch.setattr(Method, "update", update)


_STEP = [0]


def test_lr_rewinding_keeps_the_weights_and_rewinds_the_schedule():
    mgr, _, rec = _run(_imp(rewind="lr"))
    for t in (5, 10, 15):
        w_before, w_after = rec["w"][t], rec["w"][t + 1]
        for n in w_before:
            if n in mgr.views:
                keep = _MASKS[t][n].view_as(w_before[n])
                assert torch.equal(w_after[n][keep], w_before[n][keep]), "LR rewinding keeps the trained weights"
            else:
                assert torch.equal(w_after[n], w_before[n]), "the round-end step is not applied"
        assert rec["lr"][t + 1] == pytest.approx(rec["lr"][K])
        assert rec["count"][t] == 0.0


def test_imp_without_rewinding_fine_tunes():
    mgr, _, rec = _run(_imp(rewind="none"))
    assert rec["lr"][6] == pytest.approx(0.05 / 7), "no LR rewinding"
    assert rec["count"][6] > 1.0, "the optimizer goes on"


def test_global_imp_and_an_explicit_prune_fraction():
    mgr, _, _ = _run(_imp(distribution="global", sparsity=1 - 0.8 ** 3, prune_fraction=0.2))
    total = sum(v.numel for v in mgr.views.values())
    kept = sum(int(ps.keep.sum()) for ps in mgr.state)
    assert kept == round(0.8 ** 3 * total) or abs(kept - 0.8 ** 3 * total) <= len(mgr.views)


@pytest.mark.parametrize("schedule,match", [
    ({"rounds": 3, "round_steps": 5, "rewind_step": 5}, "rewind_step 5 is beyond the first round"),
    ({"rounds": 2, "prune_fraction": 0.2, "round_steps": 5}, "reach density 0.64, not the recipe's 0.125"),
    ({"rounds": 4, "round_steps": 5}, "4 IMP rounds of 5 steps do not fit in 20 planned steps"),
])
def test_impossible_rounds_fail_before_any_weight_changes(schedule, match):
    model = mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    r = dd.load_recipe({"method": "imp", "sparsity": 0.875, "schedule": {"kind": "imp", **schedule}})
    with pytest.raises(ValueError, match=match):
        DimRedManager(r, model, total_steps=20).prepare()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_imp_resumes_mid_round_with_its_snapshot(tmp_path):
    """Save in round 2, load into a fresh manager: the snapshot, the LR snapshot and the pending rounds
    come back, and the next round rewinds to the same weights."""
    mgr, model, rec = _run(_imp(), steps=12)
    save_dimred_state(mgr, tmp_path)
    model2 = mlp(seed=3)
    model2.load_state_dict(model.state_dict())
    fresh = DimRedManager(_imp(), model2, total_steps=20).prepare(resuming=True)
    load_dimred_state(fresh, tmp_path)
    assert fresh.step == 12
    snap = fresh.method.rewinding.snapshot
    assert set(snap) == {n for n, _ in model2.named_parameters()}
    for n, t in snap.items():
        assert torch.equal(t.view_as(rec["w"][K][n]), rec["w"][K][n]), f"the snapshot of {n} is the weights of step k"
    assert fresh._lr_saved == mgr._lr_saved


# ---- early-bird tickets -------------------------------------------------------------------------
def _eb(threshold: float = 0.1, interval: int = 2) -> dd.Recipe:
    return dd.load_recipe({"method": "early_bird", "sparsity": 0.7, "distribution": "uniform",
                           "args": {"interval": interval, "window": 5, "threshold": threshold}})


def _train_eb(recipe: dd.Recipe, lr: float, steps: int = 14):
    model = mlp()
    mgr = DimRedManager(recipe, model, total_steps=steps).prepare()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    mgr.attach(opt)
    g = torch.Generator().manual_seed(0)
    dens = []
    for _ in range(steps):
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        dens.append(mgr.metrics()["dimred/density"])
    return mgr, model, dens


def test_early_bird_draws_the_ticket_once_the_mask_stops_moving():
    """With lr 0 the weights never move: every distance is 0, so the ticket emerges at the fifth draw
    (steps 0, 2, 4, 6, 8), before step 8; the model is dense until then."""
    mgr, model, dens = _train_eb(_eb(), lr=0.0)
    assert [h["step"] for h in mgr.topology_history] == [8.0]
    assert dens[:8] == [1.0] * 8 and dens[8] == pytest.approx(0.3, abs=0.01)
    m = mgr.metrics()
    assert m["dimred/early_bird_drawn"] == 1.0 and m["dimred/early_bird_distance"] == 0.0
    assert mgr.method.masks == [], "the remembered masks are freed"
    for ps in mgr.state:
        w = dict(model.named_parameters())[ps.name].detach().reshape(-1)
        assert bool((w[~ps.keep] == 0).all())


def test_early_bird_waits_while_the_mask_moves():
    mgr, _, dens = _train_eb(_eb(threshold=1e-9), lr=0.5)
    assert mgr.topology_history == [] and dens[-1] == 1.0
    m = mgr.metrics()
    assert m["dimred/early_bird_drawn"] == 0.0 and m["dimred/early_bird_distance"] > 0.0


def test_early_bird_search_state_survives_a_checkpoint(tmp_path):
    mgr, model, _ = _train_eb(_eb(threshold=1e-9), lr=0.5, steps=7)
    save_dimred_state(mgr, tmp_path)
    fresh = DimRedManager(_eb(threshold=1e-9), mlp(), total_steps=14).prepare(resuming=True)
    load_dimred_state(fresh, tmp_path)
    assert len(fresh.method.masks) == len(mgr.method.masks) == 4
    for a, b in zip(fresh.method.masks, mgr.method.masks):
        assert all(torch.equal(a[n], b[n]) for n in b)
    assert fresh.method.distances == mgr.method.distances
