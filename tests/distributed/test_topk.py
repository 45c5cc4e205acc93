"""Exact distributed top-k: bit-identical to a stable single-process sort, however the data is cut."""

from __future__ import annotations

import pytest
import torch

from dimred_dist.distributed.collectives import TorchCollectives
from dimred_dist.distributed.topk import Segment, _keys32, exact_topk_masks, reference_topk_mask, score_keys
from tests.dist_harness import run_distributed
from tests.distributed.topk_cases import (
    CountingCollectives,
    assemble,
    cases,
    max_rounds,
    random_pieces,
    segments_for,
)

CASES = cases()
CASE_IDS = [c[0] for c in CASES]


def test_score_keys_preserve_order_and_merge_signed_zeros():
    ordered = torch.tensor([-float("inf"), -3e38, -1.0, -1e-45, 0.0, 1e-45, 1.0, 3e38, float("inf")])
    keys = score_keys(ordered)
    assert keys.dtype == torch.int64 and bool((keys[1:] > keys[:-1]).all())
    assert int(keys.min()) >= 0 and int(keys.max()) < 2**32
    assert score_keys(torch.tensor([-0.0])).item() == score_keys(torch.tensor([0.0])).item()
    assert torch.equal(score_keys(torch.tensor([7, 0, 2**32 - 1])), torch.tensor([7, 0, 2**32 - 1]))
    assert torch.equal(score_keys(torch.tensor([0.5], dtype=torch.float64)), score_keys(torch.tensor([0.5])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64])
def test_int32_keys_of_the_select_are_the_score_keys_shifted(dtype):
    if dtype == torch.int64:
        s = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 12345])
    else:
        s = torch.cat([torch.tensor([-float("inf"), -0.0, 0.0, 1e-45, -1e-45, float("inf")]),
                       torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1e3]).to(dtype)
    k32 = _keys32(s)
    assert k32.dtype == torch.int32
    assert torch.equal(k32.to(torch.int64) + 2**31, score_keys(s))


def test_hand_worked_ties_go_to_the_lowest_index():
    s = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert exact_topk_masks([Segment(0, 0, s)], [5], [2])[0].tolist() == [False, True, True, False, False]
    assert exact_topk_masks([Segment(0, 0, s)], [5], [4])[0].tolist() == [False, True, True, True, True]
    # -0.0 does not rank below 0.0: the tie is broken by index only
    z = torch.tensor([-0.0, 0.0, -0.0, 0.0])
    assert exact_topk_masks([Segment(0, 0, z)], [4], [2])[0].tolist() == [True, True, False, False]
    # a piece starting at global index 3: the reference frame is the global index, not the local one
    masks = exact_topk_masks([Segment(0, 3, torch.tensor([5.0, 5.0])), Segment(0, 0, torch.full((3,), 5.0))], [5], [2])
    assert [m.tolist() for m in masks] == [[False, False], [True, True, False]]


def test_signed_zero_case_really_holds_negative_zeros():
    scores = dict((c[0], c[1]) for c in CASES)["many_zeros_signed"]
    assert int(torch.signbit(scores).logical_and(scores == 0).sum()) > 100


@pytest.mark.parametrize("n_pieces", [1, 3, 17])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_single_process_matches_reference(case, n_pieces):
    name, scores, k, elig = case
    n = scores.numel()
    pieces = random_pieces(n, n_pieces, torch.Generator().manual_seed(n_pieces))
    coll = CountingCollectives()
    masks = exact_topk_masks(segments_for(0, scores, elig, pieces), [n], [k], coll)
    got = assemble(n, zip(pieces, masks))
    expected = reference_topk_mask(scores, k, elig)
    assert torch.equal(got, expected)
    assert int(got.sum()) == k
    if elig is not None:
        assert not bool((got & ~elig).any())
    assert coll.calls <= max_rounds([n])


def test_reference_is_a_stable_sort_hand_worked():
    s = torch.tensor([2, 5, 5, 1, 5, 2])
    assert reference_topk_mask(s, 3).tolist() == [False, True, True, False, True, False]
    assert reference_topk_mask(s, 4).tolist() == [True, True, True, False, True, False]
    elig = torch.tensor([True, False, True, True, True, True])
    assert reference_topk_mask(s, 3, elig).tolist() == [True, False, True, False, True, False]


def test_all_groups_in_one_call():
    gen = torch.Generator().manual_seed(5)
    segs, pieces_of = [], []
    for g, (_, scores, _, elig) in enumerate(CASES):
        pieces = random_pieces(scores.numel(), 4, gen)
        segs += segments_for(g, scores, elig, pieces)
        pieces_of += [(g, p) for p in pieces]
    order = torch.randperm(len(segs), generator=gen).tolist()  # segments in any order
    coll = CountingCollectives()
    sizes = [c[1].numel() for c in CASES]
    masks = exact_topk_masks([segs[i] for i in order], sizes, [c[2] for c in CASES], coll)
    for g, (_, scores, k, elig) in enumerate(CASES):
        mine = [(pieces_of[i][1], m) for i, m in zip(order, masks) if pieces_of[i][0] == g]
        assert torch.equal(assemble(scores.numel(), mine), reference_topk_mask(scores, k, elig)), CASES[g][0]
    assert coll.calls <= max_rounds(sizes)  # all groups share the rounds


def test_global_selection_over_layers_of_very_different_sizes():
    gen = torch.Generator().manual_seed(9)
    layers = [torch.randn(3, generator=gen), torch.randn(200, 200, generator=gen).round(decimals=1),
              torch.randn(17, generator=gen) * 100, torch.full((1000,), 0.5)]
    flat = torch.cat([t.reshape(-1).abs() for t in layers])
    segs, offset = [], 0
    for t in layers:
        segs.append(Segment(0, offset, t.reshape(-1).abs()))
        offset += t.numel()
    k = 5000
    masks = exact_topk_masks(segs, [offset], [k])
    got = torch.cat(masks)
    assert torch.equal(got, reference_topk_mask(flat, k))
    per_layer = [int(m.sum()) for m in masks]
    assert per_layer[2] == 17 and per_layer[3] == 0  # the large-valued small layer wins, the 0.5 layer loses


def test_errors():
    s = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="NaN"):
        exact_topk_masks([Segment(0, 0, s)], [3], [1])
    with pytest.raises(ValueError, match="NaN"):
        reference_topk_mask(s, 1)
    ok = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="cannot select k=4 of 3"):
        exact_topk_masks([Segment(0, 0, ok)], [3], [4])
    with pytest.raises(ValueError, match="cannot select k=-1"):
        exact_topk_masks([Segment(0, 0, ok)], [3], [-1])
    with pytest.raises(ValueError, match="cannot select k=2 of 1 eligible"):
        exact_topk_masks([Segment(0, 0, ok, torch.tensor([True, False, False]))], [3], [2])
    with pytest.raises(ValueError, match="cannot select k=2 of 1 eligible"):
        reference_topk_mask(ok, 2, torch.tensor([True, False, False]))
    with pytest.raises(ValueError, match="2 values of k for 1 groups"):
        exact_topk_masks([Segment(0, 0, ok)], [3], [1, 1])
    with pytest.raises(ValueError, match=r"segment \[2, 5\) outside group 0 of size 4"):
        exact_topk_masks([Segment(0, 2, ok)], [4], [1])
    with pytest.raises(ValueError, match="integer scores must lie in"):
        exact_topk_masks([Segment(0, 0, torch.tensor([1, -1, 2]))], [3], [1])


def test_no_segments_and_zero_k():
    assert exact_topk_masks([], [10], [0]) == []
    with pytest.raises(ValueError, match="cannot select k=1 of 0"):
        exact_topk_masks([], [10], [1])


# ---- real processes -----------------------------------------------------------------------------

def _ownership(world_size: int, seed: int) -> list[list[tuple[tuple[int, int], int]]]:
    """Per case: pieces of its index space and the rank owning each (one rank owns none of it)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, (_, scores, _, _) in enumerate(CASES):
        pieces = random_pieces(scores.numel(), 2 * world_size + 1, gen)
        owners = [r for r in range(world_size) if r != i % world_size]  # rank i % ws owns nothing here
        out.append([(p, owners[int(torch.randint(len(owners), (1,), generator=gen))]) for p in pieces])
    return out


def _topk_worker(rank: int, world_size: int, ownership) -> dict:
    coll = CountingCollectives(TorchCollectives())
    per_case, calls = [], []
    for i, (_, scores, k, elig) in enumerate(CASES):  # one call per layer ...
        pieces = [p for p, r in ownership[i] if r == rank]
        coll.calls = 0
        masks = exact_topk_masks(segments_for(0, scores, elig, pieces), [scores.numel()], [k], coll)
        per_case.append(list(zip(pieces, masks)))
        calls.append(coll.calls)
    segs, keys = [], []  # ... and all layers in one call
    for i, (_, scores, _, elig) in enumerate(CASES):
        pieces = [p for p, r in ownership[i] if r == rank]
        segs += segments_for(i, scores, elig, pieces)
        keys += [(i, p) for p in pieces]
    coll.calls = 0
    masks = exact_topk_masks(segs, [c[1].numel() for c in CASES], [c[2] for c in CASES], coll)
    return {"per_case": per_case, "calls": calls, "joint": list(zip(keys, masks)), "joint_calls": coll.calls}


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_with_arbitrary_ranges_match_reference(world_size):
    ownership = _ownership(world_size, seed=world_size)
    results = run_distributed(_topk_worker, world_size, ownership)
    sizes = [c[1].numel() for c in CASES]
    for i, (name, scores, k, elig) in enumerate(CASES):
        expected = reference_topk_mask(scores, k, elig)
        union = assemble(scores.numel(), [pm for res in results for pm in res["per_case"][i]])
        assert torch.equal(union, expected), f"{name} on {world_size} ranks"
        joint = assemble(scores.numel(), [(p, m) for res in results for (g, p), m in res["joint"] if g == i])
        assert torch.equal(joint, expected), f"{name} (all groups in one call) on {world_size} ranks"
        for res in results:
            assert res["calls"][i] <= max_rounds([sizes[i]]), name
    # every rank issues the same number of collectives (otherwise they would deadlock)
    assert len({tuple(res["calls"]) for res in results}) == 1
    assert all(res["joint_calls"] <= max_rounds(sizes) for res in results)
    # the layout really had ranks owning nothing of a layer and ranks owning several pieces
    owned = [[sum(r == rank for _, r in ownership[i]) for rank in range(world_size)] for i in range(len(CASES))]
    assert all(0 in o for o in owned) and any(max(o) >= 3 for o in owned)
