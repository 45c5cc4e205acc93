"""Top-KAST under real DeepSpeed ZeRO-1/2/3 engines (2 gloo ranks, fp32 and bf16).

The ranks' pieces are reassembled by their global ranges and checked against an independent
reference written here (a stable sort of |θ| per layer in one process):

* before training and at every recomputation, B is the top-(D + M) and A the top-D of the full
  values θ (the weights on B, the store elsewhere), entries entering B restart their moments and the
  master holds θ on B and 0 outside it;
* before every optimizer step the master holds the store's values on B \\ A, and the gradient the
  optimizer sees is the reduced gradient plus the penalty's (``c θ`` on A, ``c θ / D`` on B \\ A);
* after every step every module weight (bf16 too) is 0 outside A: the forward pass sees A only,
  while the entries of B \\ A keep training in the store.
"""

from __future__ import annotations

import pytest
import torch

from dimred_dist import DimRedManager
from tests.distributed.zero_scenarios import CASE_IDS, CASES, T_DYN, suite, topkast_recipe
from tests.zero_utils import Net, assemble, make_model, scenario

pytestmark = pytest.mark.distributed


def _full(ranks: list[dict], pick) -> dict[str, torch.Tensor]:
    """Reassemble ``pick(rank record)[name]`` (local pieces) into full flat tensors."""
    r0 = ranks[0]
    return {n: assemble([(*r["ranges"][n], pick(r)[n]) for r in ranks], r0["numels"][n]) for n in r0["ranges"]}


def _field(ranks, pick, field) -> dict[str, torch.Tensor]:
    return _full(ranks, lambda r: {n: d[field] for n, d in pick(r).items()})


def _top(scores: torch.Tensor, k: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """The k largest scores (ties: lowest index), among ``eligible``."""
    s = scores.clone()
    if eligible is not None:
        s[~eligible] = -1.0
    order = torch.argsort(-s, stable=True)
    out = torch.zeros_like(scores, dtype=torch.bool)
    out[order[:k]] = True
    return out


def _budgets() -> tuple[dict[str, int], dict[str, int]]:
    recipe = topkast_recipe()
    ctx = DimRedManager(recipe, make_model(Net), total_steps=T_DYN).prepare().ctx
    return ctx.budgets(0.7), ctx.budgets(recipe.density)


@pytest.mark.parametrize(("stage", "precision"), CASES, ids=CASE_IDS)
def test_topkast_sets_are_the_top_k_of_the_full_values(stage, precision):
    ranks = scenario(suite(stage, precision), "topkast")
    r0 = ranks[0]
    nb, na = _budgets()
    # before training: θ is the initial master (held whole in the store)
    theta0 = _field(ranks, lambda r: r["init"], "theta")
    for n, t in theta0.items():
        b, a = _top(t.abs(), nb[n]), None
        a = _top(t.abs(), na[n], b)
        assert torch.equal(_field(ranks, lambda r: r["init"], "keep")[n], b), f"{n}: initial backward set"
        assert torch.equal(_field(ranks, lambda r: r["init"], "fwd")[n], a), f"{n}: initial forward set"
        assert torch.equal(_field(ranks, lambda r: r["init"], "w")[n], torch.where(a, t, 0.0)), n
        assert bool((r0["module_init"][n].reshape(-1)[~a] == 0).all()), f"{n}: the module holds B \\ A"
    updates = [k for k, s in enumerate(r0["steps"]) if s["changed"]]
    assert [r0["steps"][k]["step"] for k in updates] == [2, 4, 6, 8]
    entered = left = 0
    for k in updates:
        def before(r, k=k):
            return r["steps"][k]["before"]

        def after(r, k=k):
            return r["steps"][k]["after"]

        keep0, w0, store0 = (_field(ranks, before, f) for f in ("keep", "w", "theta"))
        keep, fwd, w, store = (_field(ranks, after, f) for f in ("keep", "fwd", "w", "theta"))
        regrown = _full(ranks, lambda r, k=k: r["steps"][k]["regrown"])
        for n in keep:
            theta = torch.where(keep0[n], w0[n], store0[n])
            b = _top(theta.abs(), nb[n])
            a = _top(theta.abs(), na[n], b)
            step = r0["steps"][k]["step"]
            assert torch.equal(keep[n], b), f"step {step}: backward set of {n}"
            assert torch.equal(fwd[n], a), f"step {step}: forward set of {n}"
            assert torch.equal(w[n], torch.where(b, theta, 0.0)), f"step {step}: the master holds θ on B"
            assert torch.equal(store[n], theta), f"step {step}: the store holds θ"
            assert torch.equal(regrown[n], b & ~keep0[n]), f"step {step}: entries entering B restart their moments"
            entered += int((b & ~keep0[n]).sum())
            left += int((keep0[n] & ~b).sum())
    assert entered > 0 and left > 0, "the recomputations must change the sets for the check to mean something"
    assert all(r["step"] == T_DYN for r in ranks)


@pytest.mark.parametrize(("stage", "precision"), CASES, ids=CASE_IDS)
def test_topkast_restores_trains_and_hides_the_backward_only_entries(stage, precision):
    ranks = scenario(suite(stage, precision), "topkast")
    r0 = ranks[0]
    coef, density = 0.05, topkast_recipe().density
    moved = 0
    for k, s in enumerate(r0["steps"]):
        def before(r, k=k):
            return r["steps"][k]["before"]

        def after(r, k=k):
            return r["steps"][k]["after"]

        keep0, fwd0, w0, store0 = (_field(ranks, before, f) for f in ("keep", "fwd", "w", "theta"))
        keep, fwd, w = (_field(ranks, after, f) for f in ("keep", "fwd", "w"))
        g_raw, g = _full(ranks, lambda r, k=k: r["steps"][k]["g_raw"]), _full(ranks, lambda r, k=k: r["steps"][k]["g"])
        for n in keep:
            hidden = keep0[n] & ~fwd0[n]
            assert torch.equal(w0[n][hidden], store0[n][hidden]), f"step {s['step']}: B \\ A restored from the store"
            pull = coef * torch.where(fwd[n], w[n], w[n] / density) * keep[n]
            tol = 1e-6 if precision == "fp32" else 2e-2
            err = float((g[n] - g_raw[n] - pull).abs().max())
            assert err <= tol * max(float(pull.abs().max()), float(g_raw[n].abs().max()), 1e-3), \
                f"step {s['step']}: the penalty's gradient of {n} is off by {err}"
            if k > 0 and not s["changed"]:
                prev = _field(ranks, lambda r, k=k: r["steps"][k - 1]["after"], "w")
                moved += int((w0[n][hidden] != prev[n][hidden]).sum())
    assert moved > 0, "the entries of B \\ A must train (their stored values move between steps)"


@pytest.mark.parametrize(("stage", "precision"), CASES, ids=CASE_IDS)
def test_topkast_module_weights_are_zero_outside_the_forward_set(stage, precision):
    ranks = scenario(suite(stage, precision), "topkast")
    r0 = ranks[0]
    assert len(r0["modules"]) == T_DYN
    hidden_total = 0
    for t in range(T_DYN):
        fwd = _full(ranks, lambda r, t=t: {n: d["fwd"] for n, d in r["modules"][t][0].items()})
        keep = _full(ranks, lambda r, t=t: {n: d["keep"] for n, d in r["modules"][t][0].items()})
        for rank in ranks:
            module = rank["modules"][t][1]
            for n, a in fwd.items():
                p = module[n].reshape(-1)
                assert bool((p[~a] == 0).all()), f"after step {t}, rank module weight {n} is nonzero outside A"
                hidden_total += int((keep[n] & ~a).sum())
    assert hidden_total > 0, "B \\ A must be non-empty for the check to mean something"
