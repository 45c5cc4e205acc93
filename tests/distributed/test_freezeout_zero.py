"""Progressive layer freezing under real DeepSpeed ZeRO-1/2/3 (2 CPU ranks, fp32 and bf16).

l1 (264 entries) freezes before step 4 and tiny (1 entry) before step 6 of 8 (see
:func:`tests.distributed.finetune_cases.freezeout_recipe`):

* a frozen layer keeps its weights bit for bit in every rank's module from its freeze point on, and
  trained before it; l2 trains to the end;
* the compact optimizer gives the layer's AdamW state back at once: the ranks' bytes fall by exactly
  8 bytes per frozen entry at the update, and that is what the update logs as released;
* the final states equal a one-process run's.
"""

from __future__ import annotations

import pytest
import torch

import dimred_dist as dd
from tests.distributed import finetune_cases as cases
from tests.zero_utils import Net, assemble, launch_once, make_model, scenario

pytestmark = pytest.mark.distributed

L1, TINY = 7 * 33 + 33, 1


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def results(request):
    return request.param, launch_once(("spiel", request.param), cases.worker, request.param)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_frozen_layers_stay_and_release_their_optimizer_state(results, stage):
    precision, res = results
    ranks = scenario(res, f"freezeout{stage}")
    h = ranks[0]["history"]
    assert [x["step"] for x in h] == [4.0, 6.0]
    assert [x["optimizer/released_bytes"] for x in h] == [8.0 * L1, 8.0 * TINY], "AdamW: 8 bytes per entry"
    total = [sum(r["bytes"][k] for r in ranks) for k in range(cases.T_FREEZE + 1)]
    # bytes[k] is after k steps; the update before step 4 runs inside the 5th step
    assert total[4] - total[5] == 8 * L1 and total[6] - total[7] == 8 * TINY
    assert all(total[k] == total[k + 1] for k in (1, 2, 3, 5)) and total[7] == total[8], total  # moments from step 1
    released = [r["history"][0]["optimizer/rank_released_bytes"] for r in ranks]
    assert released[0] == released[1] == max(r["bytes"][4] - r["bytes"][5] for r in ranks)
    w = ranks[0]["weights"]  # w[t]: after step t
    for n, point in (("l1.weight", 4), ("l1.bias", 4), ("tiny.weight", 6)):
        assert not torch.equal(w[point - 2][n], w[point - 1][n]), f"ZeRO-{stage} {precision}: {n} trains before"
        for t in range(point, cases.T_FREEZE):
            for r in ranks:
                assert torch.equal(r["weights"][t][n], w[point - 1][n]), f"ZeRO-{stage} {precision}: {n} at {t}"
    assert not torch.equal(w[6]["l2.weight"], w[7]["l2.weight"])
    ref = dd.DimRedManager(cases.freezeout_recipe(), make_model(Net), total_steps=cases.T_FREEZE).prepare()
    for t in range(cases.T_FREEZE):
        ref.method.update(ref.ctx, t)
    for n in ref.views:
        codes = assemble([r["codes"][n] for r in ranks], ref.views[n].numel)
        assert torch.equal(codes, ref.state[n].codes()), f"ZeRO-{stage}: states of {n}"
    assert ranks[0]["metrics"]["dimred/fraction/train"] == pytest.approx(170 / 435), "only l2 (33 * 5 + 5) trains"
