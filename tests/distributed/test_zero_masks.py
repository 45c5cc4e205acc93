"""Masks and weights under real DeepSpeed ZeRO-1/2/3 engines (2 gloo ranks on CPU, fp32 and bf16).

Each (stage, precision) is one launch (see :mod:`tests.distributed.zero_scenarios`); the ranks'
local pieces are reassembled here by their global ranges and compared with a single process:

* the initial masks equal ``DimRedManager(recipe, plain_model).prepare()``;
* every RigL / SET update, fed the full weights, gradients and masks the ranks held, gives the
  same masks, regrown entries and weights in one process, bit for bit; and the gradients the
  methods score are the true data-parallel mean gradient (recomputed in one process);
* PRUNE entries are exactly 0 in the fp32 masters, in every rank's module weights (bf16 too) and
  in ZeRO-3's persistent copies, right after attach and after training; FREEZE entries keep their
  initial value bit for bit;
* a rank that owns no element of a managed parameter takes part and gets its updated value.
"""

from __future__ import annotations

import pytest
import torch

from dimred_dist import DimRedManager
from tests.distributed.zero_scenarios import (
    CASE_IDS,
    CASES,
    GA_DYN,
    T_DYN,
    T_FREEZE,
    dynamic_recipe,
    freeze_recipe,
    magnitude_recipe,
    suite,
)
from tests.zero_utils import ArrayView, Net, assemble, assemble_named, batch, low_precision, make_model, scenario

pytestmark = pytest.mark.distributed

DYNAMIC = ["rigl", "set", "granet", "snfs", "mest"]


def _full_masks(ranks: list[dict], key: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    r0 = ranks[0]
    out = {}
    for n in r0["ranges"]:
        keep = assemble([(*r["ranges"][n], r[key][n][0]) for r in ranks], r0["numels"][n])
        train = assemble([(*r["ranges"][n], r[key][n][1]) for r in ranks], r0["numels"][n])
        out[n] = (keep, train)
    return out


def _full_update(ranks: list[dict], k: int, phase: str, field: str) -> dict[str, torch.Tensor]:
    r0 = ranks[0]
    return {
        n: assemble([(*r["ranges"][n], r["updates"][k][phase][n][field]) for r in ranks], r0["numels"][n])
        for n in r0["ranges"]
    }


def _ema(ranks: list[dict], step: int, beta: float) -> dict[str, torch.Tensor]:
    """m <- beta * m + g over the reassembled gradients of steps 0 .. step (one process, fp32)."""
    r0 = ranks[0]
    out = {n: torch.zeros(r0["numels"][n]) for n in r0["ranges"]}
    for t in range(step + 1):
        for n in out:
            g = assemble([(*r["ranges"][n], r["observed"][t][n]) for r in ranks], r0["numels"][n])
            out[n].mul_(beta).add_(g)
    return out


def ref_density(keep: dict[str, torch.Tensor]) -> float:
    return sum(int(k.sum()) for k in keep.values()) / sum(k.numel() for k in keep.values())


def _reference_masks(recipe, model, total_steps: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    mgr = DimRedManager(recipe, model, total_steps=total_steps).prepare()
    return {ps.name: (ps.keep.clone(), ps.train.clone()) for ps in mgr.state}


def _assert_masks_equal(got, expected, what: str) -> None:
    assert set(got) == set(expected), what
    for n in expected:
        assert torch.equal(got[n][0], expected[n][0]), f"{what}: keep mask of {n} differs"
        assert torch.equal(got[n][1], expected[n][1]), f"{what}: train mask of {n} differs"


# ---- 1. equivalence with a single process ----------------------------------------------------
@pytest.mark.parametrize("method", DYNAMIC)
@pytest.mark.parametrize(("stage", "precision"), CASES, ids=CASE_IDS)
def test_initial_random_masks_match_single_process(stage, precision, method):
    ranks = scenario(suite(stage, precision), method)
    got = _full_masks(ranks, "init")
    expected = _reference_masks(dynamic_recipe(method), make_model(Net), T_DYN)
    _assert_masks_equal(got, expected, f"initial {method} masks")
    assert any(not bool(k.all()) for k, _ in got.values()), "the initial topology prunes something"


@pytest.mark.parametrize(("stage", "precision"), CASES, ids=CASE_IDS)
def test_initial_magnitude_masks_match_single_process(stage, precision):
    """Magnitude scores read the fp32 master; under bf16 it holds the bf16-rounded weights (many ties)."""
    ranks = scenario(suite(stage, precision), "adamw")
    model = make_model(Net)
    if precision != "fp32":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    expected = _reference_masks(magnitude_recipe(), model, 5)
    _assert_masks_equal(_full_masks(ranks, "masks"), expected, "initial magnitude masks")
    params = dict(model.named_parameters())
    master0 = assemble_named(ranks, "master0")
    for n, (keep, _) in expected.items():
        w = params[n].detach().reshape(-1)
        assert torch.equal(master0[n][keep], w[keep]), f"{n}: the ZeRO master does not hold the reference weights"


@pytest.mark.parametrize("method", DYNAMIC)
@pytest.mark.parametrize(("stage", "precision"), CASES, ids=CASE_IDS)
def test_dynamic_updates_match_single_process(stage, precision, method):
    ranks = scenario(suite(stage, precision), method)
    r0 = ranks[0]
    steps = [u["step"] for u in r0["updates"]]
    assert steps == [2, 4, 6], f"expected updates before steps 2, 4, 6, got {steps}"
    assert all([u["step"] for u in r["updates"]] == steps for r in ranks)
    assert r0["managed_all"]

    ref = DimRedManager(dynamic_recipe(method), make_model(Net), total_steps=T_DYN).prepare()
    changed = moved = 0
    for k, step in enumerate(steps):
        w = _full_update(ranks, k, "before", "w")
        g = _full_update(ranks, k, "before", "g")
        keep0, train0 = _full_update(ranks, k, "before", "keep"), _full_update(ranks, k, "before", "train")
        assert all(t.dtype == torch.float32 for t in w.values()), "methods score the fp32 master"
        if method == "rigl":
            assert any(bool((g[n][~keep0[n]] != 0).any()) for n in g), "RigL must see dense gradients of pruned entries"
        if method == "granet":
            assert ref_density(keep0) > ref_density(_full_update(ranks, k, "after", "keep")), "GraNet prunes"
        if method == "snfs":  # the momentum the ranks held, and it is the average of every observed gradient
            m = _full_update(ranks, k, "before", "m")
            ema = _ema(ranks, step, ref.method.config.momentum)
            assert all(torch.equal(m[n], ema[n]) for n in m), f"step {step}: SNFS momentum is not the average"
            ref.method.m = {n: t.clone() for n, t in m.items()}
        ref.ctx.views = {n: ArrayView(n, r0["shapes"][n], w[n].clone(), g[n].clone()) for n in w}
        ref.ctx.take_requests()
        for n in w:
            ref.ctx.state[n].set_masks(keep0[n], train0[n])
        ref_metrics = ref.method.update(ref.ctx, step)

        for field in ("keep", "train", "regrown", "w"):
            got = _full_update(ranks, k, "after", field)
            for n in w:
                if field == "w":
                    exp = ref.ctx.views[n].weight()
                elif field == "regrown":
                    exp = ref.ctx.moment_resets[n]
                else:
                    exp = getattr(ref.ctx.state[n], field)
                assert torch.equal(got[n], exp), f"update before step {step}: {field} of {n} differs from one process"
        churn = [r["updates"][k]["metrics"]["dimred/churn"] for r in ranks]
        assert churn[0] == churn[1] == ref_metrics["dimred/churn"]
        changed += sum(int((ref.ctx.state[n].keep ^ keep0[n]).sum()) for n in w)
        moved += sum(int(ref.ctx.state[n].keep.sum()) != int(keep0[n].sum()) for n in w)
    assert changed > 0, "the updates must change the topology for the comparison to mean something"
    if method == "snfs":
        assert moved > 0, "SNFS redistributes: some layer's count must change"

    final = _full_masks(ranks, "final")
    _assert_masks_equal(final, {ps.name: (ps.keep, ps.train) for ps in ref.state}, "masks after the last update")
    assert all(r["step"] == T_DYN for r in ranks)


@pytest.mark.parametrize("method", DYNAMIC)
@pytest.mark.parametrize(("stage", "precision"), CASES, ids=CASE_IDS)
def test_methods_see_the_reduced_gradient(stage, precision, method):
    """The gradient slices a method scores are the data-parallel mean gradient at that step.

    Recomputed in one process from the captured full weights and every rank's micro-batches, so a
    view that read another parameter's (or another rank's) gradient would show here.
    """
    ranks = scenario(suite(stage, precision), method)
    model = make_model(Net)
    params = dict(model.named_parameters())
    # bf16 forward, backward and reduction: the 1-element parameter's gradient sums many terms
    # and loses ~5% to cancellation; a wrong slice would be off by about 100%
    tol = 1e-5 if precision == "fp32" else 0.15
    for k, step in enumerate(u["step"] for u in ranks[0]["updates"]):
        w, g = _full_update(ranks, k, "before", "w"), _full_update(ranks, k, "before", "g")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(w[n].to(low_precision(precision)).float().view_as(p))
        model.zero_grad()
        for rank in range(len(ranks)):
            for micro in range(GA_DYN):
                x, y = batch(model, step, micro, rank, precision)
                loss = torch.nn.functional.mse_loss(model(x.float()), y) / (GA_DYN * len(ranks))
                loss.backward()
        for n, p in params.items():
            ref = p.grad.reshape(-1)
            err = float((g[n].float() - ref).abs().max())
            assert err <= tol * float(ref.abs().max()), f"step {step}: gradient of {n} off by {err}"


# ---- 2. pruned means zero, frozen means fixed ------------------------------------------------
@pytest.mark.parametrize("method", DYNAMIC)
@pytest.mark.parametrize(("stage", "precision"), CASES, ids=CASE_IDS)
def test_initial_topology_reaches_every_weight_copy(stage, precision, method):
    """Right after attach_to_engine (no step yet): PRUNE entries are 0 in every rank's module weights,
    ZeRO-3's gathered parameters and its persistent full copies."""
    ranks = scenario(suite(stage, precision), method)
    masks = _full_masks(ranks, "init")
    init = make_model(Net)
    n_pruned = 0
    for n, (keep, _) in masks.items():
        n_pruned += int((~keep).sum())
        w0 = dict(init.named_parameters())[n].detach().reshape(-1)
        for rank, r in enumerate(ranks):
            w = r["module_init"][n].reshape(-1)
            assert bool((w[~keep] == 0).all()), f"rank {rank}: {n} keeps pruned weights after attach"
            assert torch.equal(w[keep], w0[keep].to(w.dtype)), f"rank {rank}: kept weights of {n} changed at attach"
    assert n_pruned > 0



@pytest.mark.parametrize("method", DYNAMIC)
@pytest.mark.parametrize(("stage", "precision"), CASES, ids=CASE_IDS)
def test_pruned_entries_are_exactly_zero_everywhere(stage, precision, method):
    ranks = scenario(suite(stage, precision), method)
    masks = _full_masks(ranks, "final")
    master = assemble_named(ranks, "master")
    weight_dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    n_pruned = 0
    for n, (keep, train) in masks.items():
        prune = ~keep
        n_pruned += int(prune.sum())
        assert bool((master[n][prune] == 0).all()), f"fp32 master of {n} has non-zero PRUNE entries"
        for rank, r in enumerate(ranks):
            w = r["module"][n]
            assert w.dtype == weight_dtype
            flat = w.reshape(-1)
            assert bool((flat[prune] == 0).all()), f"rank {rank}: module weight {n} has non-zero PRUNE entries"
            # the module holds the master, rounded to its dtype (so TRAIN entries did propagate)
            assert torch.equal(flat, master[n].to(weight_dtype)), f"rank {rank}: module weight {n} != its master"
            if n in r["persistent"]:
                assert torch.equal(r["persistent"][n].reshape(-1), flat), f"rank {rank}: stale persistent copy of {n}"
    assert n_pruned > 0
    if stage == 3:
        assert {"tiny.weight", "l2.bias"} <= set(ranks[0]["persistent"]), "ZeRO-3 must keep some persistent params"
        if method == "set":
            assert not bool(masks["l2.bias"][0].all()), "a persistent parameter must hold pruned entries"
            changed = [bool((u["before"]["l2.bias"]["keep"] != u["after"]["l2.bias"]["keep"]).any())
                       for r in ranks for u in r["updates"]]
            assert any(changed), "SET must rewire a persistent parameter"


@pytest.mark.parametrize(("stage", "precision"), CASES, ids=CASE_IDS)
def test_frozen_entries_keep_their_initial_value(stage, precision):
    ranks = scenario(suite(stage, precision), "freeze")
    masks0, masks = _full_masks(ranks, "masks0"), _full_masks(ranks, "masks")
    _assert_masks_equal(masks, masks0, "random_freeze masks must not change")
    _assert_masks_equal(masks0, _reference_masks(freeze_recipe(), make_model(Net), T_FREEZE), "random_freeze masks")
    master0, master = assemble_named(ranks, "master0"), assemble_named(ranks, "master")
    n_frozen = 0
    for n, (keep, train) in masks.items():
        assert bool(keep.all()), "freezing prunes nothing"
        frozen = keep & ~train
        n_frozen += int(frozen.sum())
        assert torch.equal(master[n][frozen], master0[n][frozen]), f"fp32 master: FREEZE entries of {n} moved"
        if bool(train.any()) and train.numel() > 1:
            assert bool((master[n][train] != master0[n][train]).any()), f"TRAIN entries of {n} must train"
        for rank, r in enumerate(ranks):
            w0, w = r["module0"][n].reshape(-1), r["module"][n].reshape(-1)
            assert torch.equal(w[frozen], w0[frozen]), f"rank {rank}: module FREEZE entries of {n} moved"
            assert torch.equal(w, master[n].to(w.dtype)), f"rank {rank}: module weight {n} != its master"
            if n in r["persistent"]:
                assert torch.equal(r["persistent"][n].reshape(-1), w), f"rank {rank}: stale persistent copy of {n}"
    assert n_frozen > 0
    assert all(r["step"] == T_FREEZE for r in ranks)


# ---- 5. a rank that owns nothing of a managed parameter ----------------------------------------
@pytest.mark.parametrize(("stage", "precision"), CASES, ids=CASE_IDS)
def test_rank_without_elements_of_a_managed_parameter(stage, precision):
    res = suite(stage, precision)
    for name in ("rigl", "set", "adamw"):
        ranks = scenario(res, name)
        owned = [r["local_numel"]["tiny.weight"] for r in ranks]
        assert sorted(owned) == [0, 1], f"{name}: the 1-element parameter must be owned by exactly one rank: {owned}"
        assert [r["ranges"]["tiny.weight"][1] - r["ranges"]["tiny.weight"][0] for r in ranks] == owned
    ranks = scenario(res, "rigl")
    none = next(i for i, r in enumerate(ranks) if r["local_numel"]["tiny.weight"] == 0)
    assert ranks[none]["final"]["tiny.weight"][0].numel() == 0
    assert ranks[none]["master"]["tiny.weight"].numel() == 0
    owner = 1 - none
    (keep, train) = ranks[owner]["final"]["tiny.weight"]
    assert bool(train.all()), "ERK keeps the 1x1 layer dense"
    init = make_model(Net).tiny.weight.detach()
    values = [r["module"]["tiny.weight"] for r in ranks]
    assert torch.equal(values[0], values[1]), "both ranks hold the same value of the tiny parameter"
    assert not torch.equal(values[none].float(), init.to(values[none].dtype).float()), "it trained"
    assert torch.equal(values[none].reshape(-1), ranks[owner]["master"]["tiny.weight"].to(values[none].dtype))
