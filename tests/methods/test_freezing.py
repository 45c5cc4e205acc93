"""Freezing at initialization (FreezeNet, FISH) and dynamic sparse fine-tuning (SpIEL): hand-worked
masks and weights, frozen entries bit-identical through training, state round trips, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dimred_dist as dd
from dimred_dist import DimRedManager, ProbeData
from tests.methods.test_pai import BATCH, W_HAND, _half_squared_error, _linear


def _recipe(method: str, sparsity: float = 0.5, distribution: str = "global", schedule=None, **args) -> dd.Recipe:
    r = {"method": method, "sparsity": sparsity, "distribution": distribution, "args": args}
    if schedule is not None:
        r["schedule"] = schedule
    return dd.load_recipe(r)


# ---- FreezeNet ------------------------------------------------------------------------------
def test_freezenet_hand_worked():
    """SNIP's |W * g| = [[8, 4], [12, 24]]: the second row trains, the first is frozen at its value (not 0);
    training moves the second row only, and the first stays bit-identical."""
    model = _linear(W_HAND)
    mgr = DimRedManager(_recipe("freezenet"), model).prepare(probe=ProbeData([BATCH], _half_squared_error))
    ps = mgr.state["weight"]
    assert ps.train.reshape(2, 2).tolist() == [[False, False], [True, True]]
    assert bool(ps.keep.all()), "FreezeNet prunes nothing by default"
    assert model.weight.tolist() == W_HAND
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mgr.attach(opt)
    for _ in range(3):
        _half_squared_error(model, BATCH).backward()
        opt.step()
        opt.zero_grad()
    assert model.weight[0].tolist() == W_HAND[0]
    assert model.weight[1].tolist() != W_HAND[1]


def test_freezenet_prunes_the_lowest_saliency_fraction():
    """prune_fraction 0.25 of 4 entries: the lowest score (4, at [0, 1]) is pruned, the next (8) frozen."""
    model = _linear(W_HAND)
    mgr = DimRedManager(_recipe("freezenet", prune_fraction=0.25), model).prepare(
        probe=ProbeData([BATCH], _half_squared_error))
    ps = mgr.state["weight"]
    assert ps.keep.reshape(2, 2).tolist() == [[True, False], [True, True]]
    assert ps.train.reshape(2, 2).tolist() == [[False, False], [True, True]]
    assert model.weight.tolist() == [[4.0, 0.0], [3.0, -3.0]]


def test_freezenet_rejects_a_prune_fraction_above_its_sparsity():
    with pytest.raises(ValueError, match="prune_fraction 0.6 is above the recipe's sparsity 0.5"):
        DimRedManager(_recipe("freezenet", prune_fraction=0.6), _linear(W_HAND)).prepare(
            probe=ProbeData([BATCH], _half_squared_error))
    with pytest.raises(ValueError, match="prune_fraction must be in"):
        _recipe("freezenet", prune_fraction=1.0)


# ---- FISH -----------------------------------------------------------------------------------
# Two samples of one batch, x = [1, 2] both, targets [0, 1] and [4, 1]: residuals [2, -4] and [-2, -4],
# per-sample gradients [[2, 4], [-4, -8]] and [[-2, -4], [-4, -8]].
FISH_BATCH = (torch.tensor([[1.0, 2.0], [1.0, 2.0]]), torch.tensor([[0.0, 1.0], [4.0, 1.0]]))


def test_fish_squares_per_sample_gradients():
    """Sum of squares [[8, 32], [32, 128]]: 128 and 32 train (the tie 32 / 32 goes to the lower index)."""
    model = _linear(W_HAND)
    scores = dd.score_entries(_recipe("fish", batches=1), model, [FISH_BATCH], loss_fn=_half_squared_error)
    assert scores["weight"].tolist() == [[8.0, 32.0], [32.0, 128.0]]
    mgr = DimRedManager(_recipe("fish", batches=1), model).prepare(probe=ProbeData([FISH_BATCH], _half_squared_error))
    assert mgr.state["weight"].train.reshape(2, 2).tolist() == [[False, True], [False, True]]
    assert bool(mgr.state["weight"].keep.all()) and model.weight.tolist() == W_HAND


def test_fish_per_batch_squares_the_summed_gradient():
    """per_sample false: (g1 + g2)^2 = [[0, 0], [64, 256]], so the second row trains."""
    scores = dd.score_entries(_recipe("fish", batches=1, per_sample=False), _linear(W_HAND), [FISH_BATCH],
                              loss_fn=_half_squared_error)
    assert scores["weight"].tolist() == [[0.0, 0.0], [64.0, 256.0]]


def test_split_batch_rejects_ragged_batches():
    from dimred_dist.distributed.probe import split_batch

    assert [s["a"].tolist() for s in split_batch({"a": torch.tensor([1, 2]), "k": 3})] == [[1], [2]]
    from transformers import BatchEncoding

    enc = BatchEncoding({"input_ids": torch.tensor([[1, 2], [3, 4]]), "labels": torch.tensor([0, 1])})
    assert [s["input_ids"].tolist() for s in split_batch(enc)] == [[[1, 2]], [[3, 4]]]
    with pytest.raises(ValueError, match="leading sizes"):
        split_batch({"a": torch.zeros(2), "b": torch.zeros(3)})


# ---- SpIEL ----------------------------------------------------------------------------------
SPIEL_SCHEDULE = {"kind": "periodic", "interval": 4, "offset": 2, "drop_fraction": 0.5, "decay": "constant",
                  "end_fraction": 1.0, "first_drop_fraction": 1.0, "skip_step": False}
W0 = [[1.0, 2.0], [3.0, 4.0]]
# Hand-chosen gradients per step. Step 1 opens the first window (accumulation_steps 2): candidates are
# the two largest |g1| ([0, 1] and [1, 0]); step 2 adds g2; its 9 at [0, 0] is no candidate.
GRADS = {
    0: [[0.5, 0.5], [0.5, 0.5]],
    1: [[0.1, -5.0], [3.0, 0.2]],
    2: [[9.0, 1.0], [-4.0, 0.0]],
    5: [[7.0, 0.0], [0.0, 6.0]],
    6: [[-1.0, 0.0], [0.0, -8.0]],
}


def _spiel_manager(model):
    return DimRedManager(_recipe("spiel", 0.5, "uniform", SPIEL_SCHEDULE, accumulation_steps=2), model,
                         total_steps=8).prepare()


def _spiel_step(mgr, model, opt, t):
    for g in opt.param_groups:
        g["lr"] = 0.0 if t < 2 else 0.1
    model.weight.grad = torch.tensor(GRADS.get(t, [[0.0, 0.0], [0.0, 0.0]]))
    opt.step()
    opt.zero_grad()


def _spiel_run(steps: int, opt_cls=torch.optim.SGD, **opt_args):
    """A SpIEL manager on W0 attached to ``opt_cls`` at lr 0, after ``steps`` hand-fed steps."""
    model = _linear(W0)
    mgr = _spiel_manager(model)
    opt = opt_cls(model.parameters(), lr=0.0, **opt_args)
    mgr.attach(opt)
    for t in range(steps):
        _spiel_step(mgr, model, opt, t)
    return model, mgr, opt


def test_spiel_hand_worked():
    """Update at step 2 (drop fraction 1): both TRAIN entries go, the two candidates by |g1 + g2| = [4, 1]
    come. Steps 2-5 move them by -0.1 g: [0, 1] to 1.9 (moved 0.1), [1, 0] to 3.4 (moved 0.4). Update at
    step 6 (drop 0.5, one entry): [0, 1] moved least, returns to exactly 2.0 and freezes; the window's
    candidates are [0, 0] and [1, 1] with |7 - 1| = 6 and |6 - 8| = 2, so [0, 0] grows from its pretrained
    1.0 and step 6 moves it to 1.1. [1, 1] stays frozen at 4.0 through a gradient of -8."""
    model = _linear(W0)
    mgr = _spiel_manager(model)
    initial = mgr.state["weight"].train.clone()
    assert int(initial.sum()) == 2
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mgr.attach(opt)
    for t in range(7):
        _spiel_step(mgr, model, opt, t)
        if t == 2:
            assert mgr.state["weight"].train.reshape(2, 2).tolist() == [[False, True], [True, False]]
    assert [h["step"] for h in mgr.topology_history] == [2.0, 6.0]
    assert mgr.state["weight"].train.reshape(2, 2).tolist() == [[True, False], [True, False]]
    assert bool(mgr.state["weight"].keep.all())
    w = model.weight.detach()
    assert w[0, 1].item() == 2.0 and w[1, 1].item() == 4.0, "dropped and frozen entries hold the pretrained value"
    torch.testing.assert_close(w, torch.tensor([[1.1, 2.0], [3.4, 4.0]]), rtol=0, atol=1e-6)
    assert not mgr.method.cand and not mgr.method.acc, "the window's buffers are freed after the update"


def test_spiel_resumes_inside_an_accumulation_window():
    """State saved after step 5 (candidates and sums held) and loaded into a fresh manager: step 6 gives
    the same masks and weights as the uninterrupted run."""
    model, mgr, opt = _spiel_run(6)
    sd = mgr.state_dict()
    assert set(sd["tensors"]) == {"w0", "candidate", "grad_sum"}
    assert sd["tensors"]["w0"]["weight"].tolist() == [1.0, 2.0, 3.0, 4.0], "w0 over the full range"
    model2 = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model2.weight.copy_(model.weight)
    mgr2 = _spiel_manager(model2)
    mgr2.load_state_dict(sd)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.0)
    mgr2.attach(opt2)
    _spiel_step(mgr, model, opt, 6)
    _spiel_step(mgr2, model2, opt2, 6)
    assert torch.equal(mgr.state["weight"].train, mgr2.state["weight"].train)
    assert torch.equal(model.weight, model2.weight)


def test_spiel_resets_the_moments_of_grown_entries():
    """With AdamW, an entry grown at step 6 starts with zero moments: a stale moment planted at [0, 0]
    before the update is gone, and step 6 leaves (1 - beta1) * g6 there."""
    model, mgr, opt = _spiel_run(6, torch.optim.AdamW, weight_decay=0.0)
    opt.state[model.weight]["exp_avg"][0, 0] = 5.0
    opt.state[model.weight]["exp_avg_sq"][0, 0] = 5.0
    _spiel_step(mgr, model, opt, 6)
    # [0, 0] grew at 6: its first moment is (1 - beta1) * g6 only
    assert opt.state[model.weight]["exp_avg"][0, 0].item() == pytest.approx(0.1 * -1.0)
    assert opt.state[model.weight]["exp_avg_sq"][0, 0].item() == pytest.approx(0.001 * 1.0)


def test_spiel_needs_a_periodic_schedule():
    with pytest.raises(ValueError, match="periodic schedule"):
        DimRedManager(_recipe("spiel", 0.5, "uniform", {"kind": "one_shot"}), _linear(W0), total_steps=8).prepare()
    with pytest.raises(ValueError, match="accumulation_steps"):
        _recipe("spiel", accumulation_steps=0)


def test_freezing_at_initialization_refuses_later_schedules():
    for method in ("freezenet", "fish"):
        with pytest.raises(ValueError, match=f"{method} chooses its TRAIN entries once, before step 0"):
            DimRedManager(_recipe(method, schedule={"kind": "one_shot", "at_step": 3}), _linear(W_HAND),
                          total_steps=8).prepare(probe=ProbeData([BATCH], _half_squared_error))


def test_spiel_refuses_windows_longer_than_its_interval():
    with pytest.raises(ValueError, match="accumulation_steps 5 is longer than the schedule's interval 4"):
        DimRedManager(_recipe("spiel", 0.5, "uniform", SPIEL_SCHEDULE, accumulation_steps=5), _linear(W0),
                      total_steps=8).prepare()


def test_spiel_skips_a_non_finite_step_in_its_sums():
    """An inf gradient inside a window (an fp16 overflow step) adds nothing to the sums; a finite one adds."""
    model, mgr, opt = _spiel_run(2)
    m = mgr.method
    assert m.cand["weight"].tolist() == [1, 2] and m.acc["weight"].tolist() == [-5.0, 3.0], "g1 at the candidates"
    model.weight.grad = torch.tensor([[9.0, float("inf")], [-4.0, 0.0]])
    m.observe(mgr.ctx, 2)
    assert m.acc["weight"].tolist() == [-5.0, 3.0]
    model.weight.grad = torch.tensor([[9.0, 1.0], [-4.0, 0.0]])
    m.observe(mgr.ctx, 2)
    assert m.acc["weight"].tolist() == [-4.0, -1.0]
