"""Static methods (random, magnitude, random_freeze) through DimRedManager, on one and several ranks."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from dimred_dist import DimRedManager
from dimred_dist.core.distributions import keep_counts, layer_densities
from dimred_dist.core.rng import random_uint32
from tests.dist_harness import run_distributed
from tests.models import MODELS, masks, recipe

METHODS = ["random", "magnitude", "random_freeze"]
DISTRIBUTIONS = ["uniform", "erk", "global"]


def _prepared(method, sparsity, distribution, model_name, seed=0):
    model = MODELS[model_name]()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    mgr = DimRedManager(recipe(method, sparsity, distribution, seed), model).prepare()
    return mgr, w0


def _expected_counts(mgr, sparsity, distribution):
    shapes = {n: v.shape for n, v in mgr.views.items()}
    return keep_counts(layer_densities(distribution, shapes, 1.0 - sparsity), shapes)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("method", METHODS)
def test_kept_counts_and_weights(method, sparsity, distribution, model_name):
    mgr, w0 = _prepared(method, sparsity, distribution, model_name)
    counts = _expected_counts(mgr, sparsity, distribution)
    selected = {ps.name: ps.train for ps in mgr.state}
    if distribution == "global":
        assert sum(int(m.sum()) for m in selected.values()) == sum(counts.values())
    else:
        assert {n: int(m.sum()) for n, m in selected.items()} == counts
    params = dict(mgr.model.named_parameters())
    for ps in mgr.state:
        w, init = params[ps.name].detach().reshape(-1), w0[ps.name].reshape(-1)
        if method == "random_freeze":
            assert bool(ps.keep.all()), "freezing never prunes"
            assert torch.equal(w, init), "freezing keeps every value"
        else:
            assert torch.equal(ps.train, ps.keep), "pruning methods leave no FREEZE entry"
            assert bool((w[~ps.keep] == 0).all()) and torch.equal(w[ps.keep], init[ps.keep])
    unmanaged = set(params) - set(selected)
    assert all(torch.equal(params[n], w0[n]) for n in unmanaged)
    if sparsity == 0.0:
        assert all(bool(ps.train.all()) for ps in mgr.state)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_magnitude_keeps_the_largest(distribution):
    mgr, w0 = _prepared("magnitude", 0.8, distribution, "mixed")
    kept = {ps.name: w0[ps.name].reshape(-1).abs()[ps.keep] for ps in mgr.state}
    dropped = {ps.name: w0[ps.name].reshape(-1).abs()[~ps.keep] for ps in mgr.state}
    if distribution == "global":
        assert float(torch.cat(list(kept.values())).min()) >= float(torch.cat(list(dropped.values())).max())
    else:
        for n in kept:
            if kept[n].numel() and dropped[n].numel():
                assert float(kept[n].min()) >= float(dropped[n].max()), n


def test_random_is_the_top_k_of_the_counter_rng():
    mgr, _ = _prepared("random", 0.7, "erk", "mixed", seed=5)
    counts = _expected_counts(mgr, 0.7, "erk")
    for ps in mgr.state:
        scores = random_uint32(5, 0, ps.name, 0, ps.numel)
        top = torch.zeros(ps.numel, dtype=torch.bool)
        top[torch.sort(scores, descending=True, stable=True).indices[: counts[ps.name]]] = True
        assert torch.equal(ps.keep, top), ps.name
    other, _ = _prepared("random", 0.7, "erk", "mixed", seed=6)
    assert not torch.equal(other.state["big.weight"].keep, mgr.state["big.weight"].keep)


def _linear(weights: list[list[float]]) -> nn.Linear:
    lin = nn.Linear(len(weights[0]), len(weights), bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(weights))
    return lin


def test_magnitude_hand_worked_with_a_tie():
    # |w| = .5 2 .1 3 / .5 0 1 .1: keep 4 -> 3, 2, 1 and the first of the two 0.5s (index 0, not 4)
    model = nn.Sequential(_linear([[0.5, -2.0, 0.1, 3.0], [-0.5, 0.0, 1.0, -0.1]]))
    mgr = DimRedManager(recipe("magnitude", 0.5), model).prepare()
    assert mgr.state["0.weight"].keep.reshape(2, 4).tolist() == [[True, True, False, True], [False, False, True, False]]
    assert model[0].weight.tolist() == [[0.5, -2.0, 0.0, 3.0], [0.0, 0.0, 1.0, 0.0]]


def test_magnitude_global_hand_worked_tie_across_layers():
    # budget 1 + 2 = 3 over |w| = [.5 .9] + [.9 .5 .1 .2]: .9 (a), .9 (b), then .5 of layer a before .5 of b
    model = nn.Sequential(_linear([[0.5, -0.9]]), _linear([[0.9, 0.5], [-0.1, 0.2]]))
    mgr = DimRedManager(recipe("magnitude", 0.5, "global"), model).prepare()
    assert mgr.state["0.weight"].keep.tolist() == [True, True]
    assert mgr.state["1.weight"].keep.tolist() == [True, False, False, False]


def test_random_hand_worked():
    # random_uint32(0, 0, "0.weight", 0, 8) = 2730852276 2756692338 3810880510 2961254494
    #                                         3239146037 2518092860 3690526340 22634098
    # the 4 largest are at indices 2, 6, 4, 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    mgr = DimRedManager(recipe("random", 0.5), model).prepare()
    expected = [[False, False, True, True], [True, False, True, False]]
    assert mgr.state["0.weight"].keep.reshape(2, 4).tolist() == expected
    assert bool((model[0].weight[~torch.tensor(expected)] == 0).all())


def test_random_freeze_hand_worked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    w0 = model[0].weight.detach().clone()
    mgr = DimRedManager(recipe("random_freeze", 0.5), model).prepare()
    ps = mgr.state["0.weight"]
    # the same draw as random pruning: TRAIN where random keeps, FREEZE (not 0) elsewhere
    assert ps.codes().reshape(2, 4).tolist() == [[1, 1, 0, 0], [0, 1, 0, 1]]
    assert torch.equal(model[0].weight, w0)


# ---- real processes: DDP-style replicas must draw the single-process masks ------------------------

CONFIGS = list(itertools.product(METHODS, DISTRIBUTIONS, [0.5, 0.9], list(MODELS)))
# (flat index of "0.weight", new state) that rank 1 alone sets before an agreement check
FLIPS = [(0, "toggle_keep"), (5, "toggle_keep"), (-1, "toggle_keep"), (7, "freeze")]


def _static_worker(rank: int, world_size: int) -> dict:
    out: dict = {"masks": {}, "agreement": None, "flipped": {}}
    for cfg in CONFIGS:
        method, distribution, sparsity, model_name = cfg
        try:  # a failing config must not hide the others
            mgr = DimRedManager(recipe(method, sparsity, distribution), MODELS[model_name]()).prepare()
            out["masks"][cfg] = masks(mgr)
        except Exception as e:  # noqa: BLE001
            out["masks"][cfg] = f"{type(e).__name__}: {e}"
    mgr = DimRedManager(recipe("random", 0.5), MODELS["mlp"]()).prepare()
    assert mgr.adapter.topology.world_size == world_size
    mgr.check_agreement()
    out["agreement"] = "ok"
    ps = mgr.state["0.weight"]
    for idx, how in FLIPS:
        saved = ps.keep, ps.train
        keep, train = ps.keep, ps.train
        if rank == 1 and how == "toggle_keep":
            keep[idx] = ~keep[idx]
            train[idx] = keep[idx]
        elif rank == 1:
            keep[idx], train[idx] = True, False
        ps.set_masks(keep, train)
        try:
            mgr.check_agreement()
            out["flipped"][(idx, how)] = None
        except RuntimeError as e:
            out["flipped"][(idx, how)] = str(e)
        ps.set_masks(*saved)
    mgr.check_agreement()  # agreeing again once restored
    out["restored"] = "ok"
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda ws: f"ws{ws}")
def ddp_run(request):
    return request.param, run_distributed(_static_worker, request.param)


@pytest.mark.distributed
def test_replicated_masks_equal_single_process(ddp_run):
    world_size, results = ddp_run
    wrong = []
    for cfg in CONFIGS:
        method, distribution, sparsity, model_name = cfg
        ref = masks(DimRedManager(recipe(method, sparsity, distribution), MODELS[model_name]()).prepare())
        for rank, res in enumerate(results):
            got = res["masks"][cfg]
            if isinstance(got, str):
                wrong.append((cfg, rank, got))
            elif any(not (torch.equal(got[n][0], ref[n][0]) and torch.equal(got[n][1], ref[n][1])) for n in ref):
                kept = {n: (int(got[n][1].sum()), int(ref[n][1].sum())) for n in ref}
                wrong.append((cfg, rank, f"masks differ; (kept, single-process kept) per layer: {kept}"))
    assert not wrong, f"{len(wrong)} of {len(CONFIGS) * world_size} (config, rank) differ on {world_size} ranks: {wrong[:4]}"


@pytest.mark.distributed
def test_check_agreement_passes_on_equal_masks(ddp_run):
    _, results = ddp_run
    assert [res["agreement"] for res in results] == ["ok"] * len(results)
    assert [res["restored"] for res in results] == ["ok"] * len(results)


@pytest.mark.distributed
@pytest.mark.parametrize("flip", FLIPS, ids=[f"{how}@{idx}" for idx, how in FLIPS])
def test_check_agreement_names_a_diverged_parameter(ddp_run, flip):
    _, results = ddp_run
    for rank, res in enumerate(results):
        msg = res["flipped"][flip]
        assert msg is not None, f"rank {rank}: {flip[1]} at flat index {flip[0]} on rank 1 went unnoticed"
        assert "0.weight" in msg and "disagree" in msg
