"""SpIEL under real DeepSpeed ZeRO-1/2/3 (2 CPU ranks, fp32 and bf16), against a one-process replay.

* each accumulation window's candidates are the per-layer top |g| of the full reduced gradient of its
  first step, as many as the layer trains (recomputed in one process);
* each update, fed the full weights, pretrained values, candidates, gradient sums and masks the ranks
  held, gives the same masks and weights in one process, bit for bit;
* every entry FREEZE at the end holds its pretrained value bit for bit in the module weights.
"""

from __future__ import annotations

import pytest
import torch

import dimred_dist as dd
from tests.distributed import finetune_cases as cases
from tests.zero_utils import ArrayView, Net, assemble, launch_once, make_model, scenario

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def results(request):
    return request.param, launch_once(("spiel", request.param), cases.worker, request.param)


def _full(ranks: list[dict], get) -> dict[str, torch.Tensor]:
    names = get(ranks[0]).keys()
    numel = {n: max(get(r)[n][1] for r in ranks) for n in names}
    return {n: assemble([get(r)[n] for r in ranks], numel[n]) for n in names}


def _ranks_and_reference(results, stage: int, key: str, steps: list[int]):
    """The ranks' records of ZeRO-``stage`` (their ``key`` events at ``steps``) and a one-process manager."""
    precision, res = results
    ranks = scenario(res, f"spiel{stage}")
    assert [w["step"] for w in ranks[0][key]] == steps
    return precision, ranks, dd.DimRedManager(cases.recipe(), make_model(Net), total_steps=cases.T).prepare()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_candidates_are_the_top_gradients_of_the_window(results, stage):
    precision, ranks, ref = _ranks_and_reference(results, stage, "windows", [1, 5, 9])
    for k in range(3):
        grad = _full(ranks, lambda r: r["windows"][k]["grad"])
        train = _full(ranks, lambda r: r["windows"][k]["train"])
        got = _full(ranks, lambda r: r["windows"][k]["cand"])
        ref.ctx.views = {n: ArrayView(n, ref.views[n].shape, torch.zeros_like(g), g) for n, g in grad.items()}
        expected = ref.ctx.select({n: g.abs() for n, g in grad.items()}, {n: int(t.sum()) for n, t in train.items()})
        for n in grad:
            assert torch.equal(got[n], expected[n]), f"ZeRO-{stage} {precision} window {k}: candidates of {n}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_updates_match_one_process(results, stage):
    precision, ranks, ref = _ranks_and_reference(results, stage, "updates", [2, 6, 10])
    m = ref.method
    for k, u0 in enumerate(ranks[0]["updates"]):
        b = {key: _full(ranks, lambda r, key=key: r["updates"][k]["before"][key]) for key in u0["before"]}
        ref.ctx.views = {n: ArrayView(n, ref.views[n].shape, w.clone(), None) for n, w in b["weight"].items()}
        for n, t in b["train"].items():
            ref.state[n].set_train(t.clone())
        m.w0 = {n: w0[b["train"][n]].clone() for n, w0 in b["w0"].items()}
        m.cand = {n: c.nonzero().squeeze(1) for n, c in b["candidate"].items()}
        m.acc = {n: b["grad_sum"][n][i].clone() for n, i in m.cand.items()}
        m.update(ref.ctx, u0["step"])
        ref.ctx.take_requests()
        train = _full(ranks, lambda r: r["updates"][k]["train"])
        weight = _full(ranks, lambda r: r["updates"][k]["weight"])
        for n in train:
            assert torch.equal(train[n], ref.state[n].train), f"ZeRO-{stage} {precision} update {k}: mask of {n}"
            assert torch.equal(weight[n], ref.ctx.views[n].weight()), f"ZeRO-{stage} update {k}: weights of {n}"
        dropped = b["train"]["l1.weight"] & ~train["l1.weight"]
        assert bool(dropped.any()), "the update dropped entries (the replay compares a real swap)"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_frozen_entries_hold_the_pretrained_values(results, stage):
    precision, res = results
    ranks = scenario(res, f"spiel{stage}")
    codes = _full(ranks, lambda r: r["codes"])
    initial, final = ranks[0]["initial"], ranks[0]["final"]
    for n, c in codes.items():
        frozen = c == 1  # FREEZE
        assert bool(frozen.any())
        assert torch.equal(final[n].reshape(-1)[frozen], initial[n].reshape(-1)[frozen]), f"ZeRO-{stage}: {n}"
    trained = codes["l1.weight"] == 0
    assert not torch.equal(final["l1.weight"].reshape(-1)[trained], initial["l1.weight"].reshape(-1)[trained])
