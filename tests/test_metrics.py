"""The metrics dict: ITOP rate, churn with the step of its update, optimizer bytes against dense."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from dimred_dist import DimRedManager
from dimred_dist.core.state import DimRedState, ParamState
from dimred_dist.distributed.collectives import TorchCollectives
from dimred_dist.metrics import EverActive, compute_metrics, optimizer_bytes
from dimred_dist.optim.compact import CompactAdamW, CompactSGD
from tests.dist_harness import run_distributed
from tests.models import mlp, recipe


def _train(model, opt, steps: int, after_step=None) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if after_step:
            after_step()


def test_itop_rate_of_set_is_the_fraction_of_ever_active_entries():
    model = mlp()
    rec = recipe("set", 0.8, "erk", update_interval=1, drop_fraction=0.5)
    mgr = DimRedManager(rec, model, total_steps=12).prepare()
    opt = CompactAdamW(model.parameters(), lr=0.01)
    mgr.attach(opt)
    ever = {ps.name: ps.keep.clone() for ps in mgr.state}  # by hand, next to the manager's bit-packed copy
    total = sum(v.numel for v in mgr.views.values())
    rates = [mgr.metrics()["dimred/itop_rate"]]
    assert rates[0] == pytest.approx(mgr.metrics()["dimred/density"])  # only the initial topology so far

    def record():
        for ps in mgr.state:
            ever[ps.name] |= ps.keep
        rates.append(mgr.metrics()["dimred/itop_rate"])
        assert rates[-1] == sum(int(m.sum()) for m in ever.values()) / total

    _train(model, opt, 12, record)
    assert len(mgr.topology_history) == 8  # steps 1..8 (updates stop at 0.75 of 12)
    assert all(b >= a for a, b in itertools.pairwise(rates)), rates
    assert rates[-1] > 2 * rates[0]  # SET explores: half of the active entries move at the first update
    assert rates[-1] <= 1.0


def test_static_methods_report_no_itop_and_no_updates():
    mgr = DimRedManager(recipe("magnitude", 0.7, "erk"), mlp()).prepare()
    m = mgr.metrics()
    assert "dimred/itop_rate" not in m and "dimred/churn" not in m and "dimred/last_update_step" not in m
    assert m["dimred/topology_updates"] == 0.0
    assert not any(k.startswith("dimred/optimizer/") for k in m)  # no optimizer attached


def test_churn_is_reported_with_the_step_of_its_update():
    model = mlp()
    mgr = DimRedManager(recipe("set", 0.7, "uniform", update_interval=3), model, total_steps=12).prepare()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr.attach(opt)
    seen, changed = [], {}
    keep = {ps.name: ps.keep.clone() for ps in mgr.state}

    def record():
        step = mgr.step - 1  # the optimizer step that just ran; a due update ran before it
        now = {ps.name: ps.keep.clone() for ps in mgr.state}
        if any(not torch.equal(now[n], keep[n]) for n in now):
            changed[step] = sum(int((now[n] ^ keep[n]).sum()) for n in now)
            keep.update(now)
        seen.append(mgr.metrics())

    _train(model, opt, 12, record)
    total = sum(v.numel for v in mgr.views.values())
    assert sorted(changed) == [3, 6]  # update_interval 3, updates stop at step 9 = 0.75 * 12
    assert [h["step"] for h in mgr.topology_history] == [3.0, 6.0]
    for step, m in enumerate(seen):
        done = [s for s in changed if s <= step]
        assert m["dimred/topology_updates"] == len(done)
        if not done:
            assert "dimred/churn" not in m and "dimred/last_update_step" not in m
            continue
        last = max(done)
        assert m["dimred/last_update_step"] == last  # a later step repeats the value with its own step
        assert m["dimred/churn"] == changed[last] / total
        assert m["dimred/churn"] == mgr.topology_history[done.index(last)]["churn"]
    assert all(h["seconds"] > 0 for h in mgr.topology_history)
    assert seen[-1]["dimred/topology_update_seconds"] >= sum(h["seconds"] for h in mgr.topology_history)


@pytest.mark.parametrize("opt_cls,moments", [(CompactAdamW, 2), (CompactSGD, 1)])
def test_optimizer_bytes_against_state_bytes_and_dense(opt_cls, moments):
    model = mlp()
    mgr = DimRedManager(recipe("random", 0.9, "uniform"), model).prepare()
    opt = opt_cls(model.parameters(), lr=0.01)
    mgr.attach(opt)
    _train(model, opt, 2)
    m = mgr.metrics()
    n_entries = sum(p.numel() for p in model.parameters())
    assert m["dimred/optimizer/state_bytes"] == opt.state_bytes() == m["dimred/optimizer/rank_state_bytes"]
    assert m["dimred/optimizer/dense_bytes"] == 4 * moments * n_entries == m["dimred/optimizer/rank_dense_bytes"]
    assert m["dimred/optimizer/reclaimed_bytes"] == m["dimred/optimizer/dense_bytes"] - opt.state_bytes()
    assert m["dimred/optimizer/rank_reclaimed_bytes"] == m["dimred/optimizer/reclaimed_bytes"]
    assert 0.1 < m["dimred/optimizer/state_bytes"] / m["dimred/optimizer/dense_bytes"] < 0.35  # biases stay dense


def test_dense_bytes_equal_what_torch_adamw_holds():
    model = mlp()
    dense = torch.optim.AdamW(model.parameters())
    _train(model, dense, 1)
    held = sum(st[k].numel() * st[k].element_size() for st in dense.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert optimizer_bytes(dense) is None  # only compact optimizers are accounted
    assert optimizer_bytes(CompactAdamW(model.parameters()))[1] == held


def _two_ranks(rank: int, world_size: int):
    # Rank r owns a different share of one 10-entry parameter and a flat partition of its own size,
    # as under ZeRO; the sums and the per-rank bytes come from one all-reduce.
    start, end = (0, 3) if rank == 0 else (3, 10)
    ps = ParamState.dense("w", (10,), start, end)
    ps.set_keep(torch.arange(start, end) % 2 == 0)
    state = DimRedState({"w": ps})
    ever = EverActive(state)
    ps.set_keep(torch.arange(start, end) % 3 == 0)
    ever.update(state)
    flat = torch.zeros(end - start, requires_grad=True)
    opt = CompactAdamW([flat])
    opt.set_train_mask(flat, ps.train)
    flat.grad = torch.ones_like(flat)
    opt.step()
    m = compute_metrics(state, ["w"], TorchCollectives(), ever=ever, optimizer=opt, update_seconds=0.0, history=[])
    return m, optimizer_bytes(opt)


@pytest.mark.distributed
def test_two_ranks_sum_counts_and_gather_bytes():
    (m0, b0), (m1, b1) = run_distributed(_two_ranks, 2)
    assert m0 == m1
    assert m0["dimred/density"] == 4 / 10  # entries 0, 3, 6, 9
    assert m0["dimred/itop_rate"] == 7 / 10  # ever kept: 0, 2, 4, 6, 8 and 3, 9
    assert m0["dimred/optimizer/state_bytes"] == b0[0] + b1[0]
    assert m0["dimred/optimizer/dense_bytes"] == b0[1] + b1[1] == 2 * 4 * 10
    assert (m0["dimred/optimizer/rank_state_bytes"], m0["dimred/optimizer/rank_dense_bytes"]) == max(b0, b1) == b1
