"""Progressive layer freezing (FreezeOut schedule): the freeze points written out by hand, frozen layers
unchanged through training, their optimizer state given back at once, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dimred_dist as dd
from dimred_dist import DimRedManager
from dimred_dist.methods.progressive import auto_groups
from dimred_dist.optim import CompactAdamW


class Blocks(nn.Module):
    """embed (4 x 3) -> blocks.0 .. blocks.2 (3 x 3 with bias) -> head (3 -> 2)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(4, 3)
        self.blocks = nn.ModuleList([nn.Linear(3, 3) for _ in range(3)])
        self.head = nn.Linear(3, 2, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        for b in self.blocks:
            h = torch.tanh(b(h))
        return self.head(h)


def _recipe(**args) -> dd.Recipe:
    return dd.load_recipe({"method": "freezeout", "sparsity": 0.0, "targets": {"biases": True}, "args": args})


def test_auto_groups_by_numbered_blocks():
    names = ["embed.weight", "blocks.0.weight", "blocks.0.bias", "blocks.1.weight", "blocks.2.weight", "head.weight"]
    assert auto_groups(names) == [["embed.weight"], ["blocks.0.weight", "blocks.0.bias"], ["blocks.1.weight"],
                                  ["blocks.2.weight"], ["head.weight"]]
    assert auto_groups(["a.weight", "b.weight"]) == [["a.weight"], ["b.weight"]]


def test_freeze_points_hand_worked():
    """Auto: 5 groups, the head trains to the end, G = 4 freeze. T = 100, t0 = 0.5:
    linear: 0.5, 0.625, 0.75, 0.875 -> steps 50, 62, 75, 87; cubic: 0.125, 0.244, 0.4219, 0.6699 -> 12, 24, 42, 66."""
    for scale, steps in (("linear", [50, 62, 75, 87]), ("cubic", [12, 24, 42, 66])):
        mgr = DimRedManager(_recipe(t0=0.5, scale=scale), Blocks(), total_steps=100).prepare()
        assert mgr.method.freeze_steps == steps, scale
        assert mgr.method.groups[0] == ["embed.weight"] and mgr.method.groups[1] == ["blocks.0.weight", "blocks.0.bias"]


def test_layers_freeze_in_order_keep_their_values_and_give_their_state_back():
    """T = 8, groups [blocks.0, embed], t0 0.5 linear: blocks.0 freezes before step 4, embed before step 6;
    blocks.1, blocks.2 and the head train to the end. AdamW holds 8 bytes per TRAIN entry: freezing
    blocks.0 (12 entries) gives back 96 bytes, embed (12) another 96."""
    model = Blocks()
    r = _recipe(groups=["^blocks\\.0\\.", "^embed\\."], t0=0.5, scale="linear")
    mgr = DimRedManager(r, model, total_steps=8).prepare()
    opt = CompactAdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    mgr.attach(opt)
    params = dict(model.named_parameters())
    snap, bytes_at = {}, {}
    for t in range(8):
        loss = model(torch.tensor([0, 1, 2, 3])).pow(2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        snap[t] = {n: p.detach().clone() for n, p in params.items()}
        bytes_at[t] = opt.state_bytes()  # after step t (and the update before it)
    h = mgr.topology_history
    assert [x["step"] for x in h] == [4.0, 6.0] and [x["frozen_groups"] for x in h] == [1.0, 2.0]
    assert [x["optimizer/released_bytes"] for x in h] == [96.0, 96.0]
    assert mgr.metrics()["dimred/optimizer/released_bytes"] == 96.0
    # frozen from step 4 on: blocks.0 unchanged; it trained until then
    for n in ("blocks.0.weight", "blocks.0.bias"):
        assert not torch.equal(snap[2][n], snap[3][n]), f"{n} trains before its point"
        assert all(torch.equal(snap[3][n], snap[t][n]) for t in range(4, 8)), f"{n} must stay frozen"
    assert not torch.equal(snap[4]["embed.weight"], snap[5]["embed.weight"])
    assert all(torch.equal(snap[5]["embed.weight"], snap[t]["embed.weight"]) for t in range(6, 8))
    assert not torch.equal(snap[6]["head.weight"], snap[7]["head.weight"]), "the rest trains to the end"
    # the optimizer holds nothing for a frozen layer
    for n in ("blocks.0.weight", "blocks.0.bias", "embed.weight"):
        st = opt.state[params[n]]
        assert all(st[k].numel() == 0 for k in ("exp_avg", "exp_avg_sq")), n
    assert bytes_at[4] == bytes_at[3] - 96 and bytes_at[6] == bytes_at[5] - 96
    assert mgr.state["blocks.0.weight"].codes().eq(int(dd.ElementState.FREEZE)).all()


def test_freezeout_bad_input():
    with pytest.raises(ValueError, match=r"freezeout: groups\[1\] 'blocks\\\\.7' names no managed parameter"):
        DimRedManager(_recipe(groups=["embed", "blocks\\.7"]), Blocks(), total_steps=8).prepare()
    with pytest.raises(ValueError, match="groups must be 'auto' or a non-empty list"):
        _recipe(groups=[])
    with pytest.raises(ValueError, match="t0 must be in"):
        _recipe(t0=1.0)
    with pytest.raises(ValueError, match="set sparsity: 0"):
        DimRedManager(dd.load_recipe({"method": "freezeout", "sparsity": 0.5}), Blocks(), total_steps=8).prepare()
    with pytest.raises(ValueError, match="give no `schedule`"):
        DimRedManager(dd.load_recipe({"method": "freezeout", "sparsity": 0.0, "schedule": {"kind": "periodic"}}),
                      Blocks(), total_steps=8).prepare()
