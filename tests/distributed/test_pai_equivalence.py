"""Pruning at initialization under DDP and real DeepSpeed ZeRO-1/2/3: the same masks as one process.

Every rank probes the same batches, so the scores do not depend on the world size or the stage:
the masks of 1, 2 and 4 replicated ranks and of ZeRO-1/2/3 engines (2 ranks, fp32 and bf16; ZeRO-3
also on 4 ranks) are bit-identical to one process running the same recipe. Under ZeRO the probe
runs through the engine and discards its gradients: the weights are the initial ones except the
pruned entries (exactly 0), and training afterwards equals training an engine that loaded the same
masks without probing.
"""

from __future__ import annotations

import pytest
import torch

from dimred_dist import DimRedManager
from tests.dist_harness import run_distributed
from tests.distributed import pai_cases as cases
from tests.zero_utils import launch_once, scenario

pytestmark = pytest.mark.distributed

ZERO_CASES = [(s, p) for s in (1, 2, 3) for p in ("fp32", "bf16")]


def _reference(method: str, precision: str) -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the kernels' summation order must match
    try:
        mgr = DimRedManager(cases.recipe(method), cases.reference_model(precision), total_steps=4)
        mgr.prepare(probe=cases.probe_data(precision))
    finally:
        torch.set_num_threads(threads)
    return {n: ps.codes() for n, ps in mgr.state.params.items()}


def _assemble(ranks: list[dict]) -> dict[str, torch.Tensor]:
    return {n: cases._full_keep([r[n] for r in ranks]) for n in ranks[0]}


def _assert_masks(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys()
    assert any(bool((c != 0).any()) for c in expected.values()), "some entries do not train"
    for n in expected:
        assert torch.equal(got[n], expected[n]), f"{what}: the mask of {n} differs from one process"


@pytest.fixture(scope="module")
def ddp_results():
    return {w: run_distributed(cases.ddp_worker, w, timeout=200) for w in (2, 4)}


@pytest.mark.parametrize("method", list(cases.METHODS))
@pytest.mark.parametrize("world", [2, 4])
def test_replicated_ranks_choose_the_single_process_masks(ddp_results, method, world):
    expected = _reference(method, "fp32")
    for rank, res in enumerate(ddp_results[world]):
        got = {n: k for n, (s, e, k) in res[method].items()}
        _assert_masks(got, expected, f"DDP rank {rank} of {world}")


def _zero(stage: int, precision: str, world: int = 2):
    if world == 2:
        return launch_once(("pai", stage, precision), cases.zero_worker, stage, precision)
    return run_distributed(cases.zero_worker, world, stage, precision, timeout=300)[0]


@pytest.mark.parametrize("method", list(cases.METHODS))
@pytest.mark.parametrize(("stage", "precision"), ZERO_CASES, ids=[f"zero{s}-{p}" for s, p in ZERO_CASES])
def test_zero_ranks_choose_the_single_process_masks(stage, precision, method):
    ranks = scenario(_zero(stage, precision), method)
    _assert_masks(_assemble([r["masks"] for r in ranks]), _reference(method, precision),
                  f"ZeRO-{stage} {precision}")
    for rank, r in enumerate(ranks):
        assert r["kept_unchanged"] and r["pruned_zero"], f"rank {rank}: the probe changed the kept weights"
        assert r["unmanaged_unchanged"] is True
        assert r["frozen_unchanged"] is True, f"rank {rank}: a FREEZE entry moved in training"
        assert r["train_equal"], f"rank {rank}: training after the probe differs from training the loaded masks"


def test_zero3_on_four_ranks():
    results = _zero(3, "fp32", world=4)
    for method in cases.METHODS:
        ranks = scenario(results, method)
        assert len(ranks) == 4
        _assert_masks(_assemble([r["masks"] for r in ranks]), _reference(method, "fp32"), f"ZeRO-3 x4 {method}")
        assert all(r["train_equal"] and r["kept_unchanged"] and r["frozen_unchanged"] for r in ranks)
