"""IMP under real DeepSpeed ZeRO-1/2/3 (2 CPU ranks, fp32 and bf16): rounds, rewinding, resuming.

* after each round the surviving entries of every fp32 master (biases and other unmanaged
  parameters included) equal the sharded snapshot of step k bit for bit, pruned entries are 0, and
  the module weights hold the masters (rounded to their dtype);
* a run saved in its second segment by 2 ranks under ZeRO-2 resumes under ZeRO-3: the snapshot is
  resharded exactly, and the pending round prunes at the same step and rewinds to that snapshot.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import lottery_cases as cases
from tests.zero_utils import assemble, launch_once, scenario

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def results(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"imp_{request.param}")
    return request.param, launch_once(("imp", request.param), cases.worker, request.param, str(path))


def _full(ranks: list[dict], key: str, name: str) -> torch.Tensor:
    return assemble([ranks[r][key][name] for r in range(len(ranks))], max(x[key][name][1] for x in ranks))


def _full_at(ranks, t, name):
    return assemble([r["after"][t][name] for r in ranks], max(x["after"][t][name][1] for x in ranks))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_round_masks_match_one_process(results, stage):
    """Each round's pruning, fed the full masters and masks the ranks held, gives the same masks in one
    process, bit for bit."""
    import dimred_dist as dd
    from tests.zero_utils import ArrayView, Net, make_model

    precision, res = results
    ranks = scenario(res, f"rounds{stage}")
    ref = dd.DimRedManager(cases.recipe(), make_model(Net), total_steps=cases.T).prepare()
    assert [u["step"] for u in ranks[0]["updates"]] == [cases.L, 2 * cases.L]
    for k, u0 in enumerate(ranks[0]["updates"]):
        numel = {n: max(r["updates"][k]["before"][n][1] for r in ranks) for n in u0["before"]}
        w = {n: assemble([r["updates"][k]["before"][n][:3] for r in ranks], numel[n]) for n in numel}
        keep0 = {n: assemble([(*r["updates"][k]["before"][n][:2], r["updates"][k]["before"][n][3]) for r in ranks],
                             numel[n]) for n in numel}
        ref.ctx.views = {n: ArrayView(n, ref.views[n].shape, w[n].clone(), None) for n in w}
        for n in w:
            ref.state[n].set_masks(keep0[n], keep0[n])
        ref.method.update(ref.ctx, u0["step"])
        ref.ctx.take_requests()
        for n in w:
            got = assemble([(*r["updates"][k]["before"][n][:2], r["updates"][k]["after"][n]) for r in ranks], numel[n])
            assert torch.equal(got, ref.state[n].keep), f"ZeRO-{stage} round {k + 1}: the mask of {n} differs"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_early_bird_under_zero(results, stage):
    import dimred_dist as dd
    from tests.zero_utils import Net, make_model

    precision, res = results
    ranks = scenario(res, f"early_bird{stage}")
    model = make_model(Net)
    if precision != "fp32":  # the masters hold the bf16-rounded initial weights
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    ref = dd.DimRedManager(dd.load_recipe({"method": "magnitude", "sparsity": 0.7, "distribution": "global"}),
                           model).prepare()
    for r in ranks:
        assert [h["step"] for h in r["history"]] == [8.0]
        assert r["density"][:8] == [1.0] * 8 and r["density"][8] == pytest.approx(0.3, abs=0.01)
        assert r["metrics"]["dimred/early_bird_drawn"] == 1.0
    for n, ps in ref.state.params.items():
        got = assemble([r["keep"][n] for r in ranks], ps.keep.numel())
        assert torch.equal(got, ps.keep), f"ZeRO-{stage}: the ticket of {n} is not the magnitude mask"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_rounds_rewind_survivors_to_the_snapshot(results, stage):
    precision, res = results
    ranks = scenario(res, f"rounds{stage}")
    r0 = ranks[0]
    assert [(h["step"], h["round"]) for h in r0["history"]] == [(cases.L, 1.0), (2 * cases.L, 2.0)]
    names = list(r0["snapshot"])
    assert {"l1.bias", "l2.bias"} <= set(names)
    counts = []
    for t in (cases.L, 2 * cases.L):
        for n in names:
            snap = _full(ranks, "snapshot", n)
            after = _full_at(ranks, t, n)
            if n in r0["keep"][t]:
                keep = assemble([(r["after"][t][n][0], r["after"][t][n][1], r["keep"][t][n]) for r in ranks],
                                snap.numel())
                assert torch.equal(after[keep], snap[keep]), f"ZeRO-{stage} step {t}: {n} survivors not rewound"
                assert bool((after[~keep] == 0).all()), f"ZeRO-{stage} step {t}: {n} pruned entries not 0"
                counts.append((int(keep.sum()), keep.numel()))
            else:
                assert torch.equal(after, snap), f"ZeRO-{stage} step {t}: {n} not rewound"
            for rank, r in enumerate(ranks):
                module = r["module"][t][n].reshape(-1)
                assert torch.equal(module, after.to(module.dtype)), f"rank {rank}: module weight {n} != its master"
    assert sum(k for k, _ in counts) > 0 and any(k < n for k, n in counts)
    keep = r0["keep"][2 * cases.L]
    kept = sum(sum(int(r["keep"][2 * cases.L][n].sum()) for r in ranks) for n in keep)
    total = sum(sum(r["keep"][2 * cases.L][n].numel() for r in ranks) for n in keep)
    assert abs(kept - 0.25 * total) <= len(keep), "(1 - p) ** R of the managed entries, up to one per layer"


def test_resume_in_segment_two_under_another_stage(results):
    precision, res = results
    ranks = scenario(res, "resume")
    assert ranks[0]["step_loaded"] == cases.L + 2
    for n in ranks[0]["saved"]["snapshot"]:
        pieces = [r["saved"]["snapshot"][n] for r in ranks]
        saved = assemble(pieces, max(p[1] for p in pieces))
        loaded = assemble([r["loaded"][n] for r in ranks], saved.numel())
        assert torch.equal(loaded, saved), f"{n}: the snapshot did not reshard exactly (ZeRO-2 -> ZeRO-3)"
        after = assemble([r["after"][n] for r in ranks], saved.numel())
        if n in ranks[0]["keep"]:
            keep = assemble([(r["after"][n][0], r["after"][n][1], r["keep"][n]) for r in ranks], saved.numel())
            assert torch.equal(after[keep], saved[keep]) and bool((after[~keep] == 0).all()), n
        else:
            assert torch.equal(after, saved), n
    assert [(h["step"], h["round"]) for h in ranks[0]["history"]] == [(cases.L, 1.0), (2 * cases.L, 2.0)], \
        "the pending round ran after the saved one"


def test_resume_in_segment_two_on_one_process(results):
    """The 2-rank ZeRO-2 save of the resume scenario, loaded by one process: the snapshot reassembles
    exactly and the pending round rewinds to it."""
    import torch.nn.functional as F

    import dimred_dist as dd
    from dimred_dist.distributed.checkpoint import load_dimred_state
    from tests.zero_utils import Net, batch, make_model

    precision, res = results
    ranks = scenario(res, "resume")
    model = make_model(Net, 9)
    weights = {n: t.float() for n, t in ranks[0]["saved"]["weights"].items()}
    model.load_state_dict(weights)
    mgr = dd.DimRedManager(cases.recipe(), model, total_steps=cases.T).prepare(resuming=True)
    load_dimred_state(mgr, ranks[0]["dir"])
    assert mgr.step == cases.L + 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mgr.attach(opt)
    for n, snap in mgr.method.rewinding.snapshot.items():
        pieces = [r["saved"]["snapshot"][n] for r in ranks]
        assert torch.equal(snap, assemble(pieces, snap.numel())), f"{n}: the snapshot did not reassemble exactly"
    for t in range(mgr.step, 2 * cases.L + 1):
        x, y = batch(model, t, 0, 0, "fp32")
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert [h["step"] for h in mgr.topology_history] == [cases.L, 2 * cases.L]  # the saved history goes on
    for n, p in model.named_parameters():
        snap = mgr.method.rewinding.snapshot[n].view_as(p)
        keep = mgr.state[n].keep.view_as(p) if n in mgr.views else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p.detach()[keep], snap[keep]), f"{n} not rewound to the resharded snapshot"
