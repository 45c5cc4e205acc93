"""Edge-popup supermasks under real DeepSpeed ZeRO-1/2/3 engines (2 gloo ranks, fp32 and bf16).

The ranks' pieces (scores, momentum, masks, masters) are reassembled by their global ranges and
checked against a reference written here: the initial scores from the seed over the whole tensor,
every score step as SGD with momentum and weight decay on ``g * w0 * sign(s)``, every top-k as a
stable sort of |s| per layer, the masters equal to ``w0`` on the top-k and 0 elsewhere, and every
rank's module weights (bf16 too) at their initial values on the final top-k and 0 elsewhere.
"""

from __future__ import annotations

import math

import pytest
import torch

from dimred_dist import DimRedManager
from dimred_dist.core.rng import random_uniform
from tests.distributed.zero_scenarios import CASE_IDS, CASES, T_DYN, edge_popup_recipe, suite
from tests.zero_utils import Net, assemble, make_model, scenario

pytestmark = pytest.mark.distributed


def _field(ranks: list[dict], pick, field) -> dict[str, torch.Tensor]:
    r0 = ranks[0]
    return {n: assemble([(*r["ranges"][n], pick(r)[n][field]) for r in ranks], r0["numels"][n]) for n in r0["ranges"]}


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros_like(scores, dtype=torch.bool)
    out[torch.argsort(-scores, stable=True)[:k]] = True
    return out


@pytest.mark.parametrize(("stage", "precision"), CASES, ids=CASE_IDS)
def test_edge_popup_scores_masks_and_frozen_weights(stage, precision):
    ranks = scenario(suite(stage, precision), "edge_popup")
    r0 = ranks[0]
    recipe = edge_popup_recipe()
    budgets = DimRedManager(recipe, make_model(Net), total_steps=T_DYN).prepare().ctx.keep_counts
    cfg = recipe.args

    def init(r):
        return r["init"]

    w0, s = _field(ranks, init, "w0"), _field(ranks, init, "scores")
    for n, shape in r0["shapes"].items():
        bound = 1.0 / math.sqrt(math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape))
        u = random_uniform(recipe.seed, 0, n, 0, r0["numels"][n], salt=7)
        assert torch.equal(s[n], ((2 * u - 1) * bound).float()), f"{n}: initial scores"
        keep = _top(s[n].abs(), budgets[n])
        assert torch.equal(_field(ranks, init, "keep")[n], keep), f"{n}: initial top-k"
        assert torch.equal(_field(ranks, init, "w")[n], torch.where(keep, w0[n], 0.0)), f"{n}: initial masters"

    assert [e["step"] for e in r0["steps"]] == list(range(T_DYN))
    buf = {n: torch.zeros_like(t) for n, t in s.items()}
    churn = 0
    for k, e in enumerate(r0["steps"]):
        def at(r, k=k):
            return r["steps"][k]["views"]

        g, s0, s_new, buf_new = (_field(ranks, at, f) for f in ("g", "s0", "s", "buf"))
        keep, train, w = _field(ranks, at, "keep"), _field(ranks, at, "train"), _field(ranks, at, "w")
        for n in s:
            assert torch.equal(s0[n], s[n]), f"step {k}: the scores carried over"
            d = g[n] * w0[n] * torch.sign(s[n]) + cfg.weight_decay * s[n]
            buf[n] = cfg.momentum * buf[n] + d
            ref = s[n] - e["lr"] * buf[n]
            assert torch.allclose(s_new[n], ref, rtol=1e-5, atol=1e-7), f"step {k}: score step of {n}"
            assert torch.allclose(buf_new[n], buf[n], rtol=1e-5, atol=1e-7), f"step {k}: score momentum of {n}"
            s[n], buf[n] = s_new[n], buf_new[n]  # continue from what the ranks hold (rounding does not accumulate)
            expected = _top(s_new[n].abs(), budgets[n])
            assert torch.equal(keep[n], expected), f"step {k}: top-k of {n}"
            assert not bool(train[n].any()), f"step {k}: a managed entry of {n} trains"
            assert torch.equal(w[n], torch.where(expected, w0[n], 0.0)), f"step {k}: masters of {n}"
            if k > 0:
                prev = _field(ranks, lambda r, k=k: r["steps"][k - 1]["views"], "keep")[n]
                churn += int((prev ^ expected).sum())
    assert churn > 0, "the top-k must move during training for the check to mean something"
    assert math.isclose(r0["steps"][1]["lr"], 0.5 * cfg.score_lr * (1 + math.cos(math.pi / T_DYN)))

    final = {n: _field(ranks, lambda r: {m: {"k": t[0]} for m, t in r["final"].items()}, "k")[n] for n in s}
    for rank in ranks:
        for n, keep in final.items():
            p = rank["module"][n].reshape(-1)
            assert torch.equal(p[keep], w0[n][keep].to(p.dtype)), f"{n}: a kept module weight is not its initial value"
            assert bool((p[~keep] == 0).all()), f"{n}: a module weight outside the top-k is nonzero"
