"""The manager in a training loop: pruned stays 0, frozen stays put, gradients are masked, state persists."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dimred_dist import DimRedManager
from dimred_dist.core.state import ElementState
from dimred_dist.optim import CompactAdamW, CompactSGD
from tests.dist_harness import run_distributed
from tests.models import masks, mlp, recipe

OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    # compact optimizers write TRAIN entries only: the manager skips its own weight enforcement
    "compact_adamw": lambda ps: CompactAdamW(ps, lr=0.05, weight_decay=0.1),
    "compact_sgd": lambda ps: CompactSGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
}


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _train(model: nn.Module, opt, batches) -> None:
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _is_plus_zero(t: torch.Tensor) -> bool:
    return bool((t.reshape(-1).view(torch.int32) == 0).all())  # +0.0 bit for bit


def _grad_probe(manager, record: list):
    """A step pre-hook recording, per managed parameter, the sum of |grad| over non-TRAIN entries."""
    def hook(*_):
        record.append({n: float(v.grad()[~manager.state[n].train].abs().sum()) for n, v in manager.views.items()})
    return hook


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("method", ["random", "magnitude", "random_freeze"])
def test_enforcement_in_a_plain_loop(method, opt_name):
    model = mlp()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    mgr = DimRedManager(recipe(method, 0.7, "erk"), model).prepare()
    opt = OPTIMIZERS[opt_name](model.parameters())
    before, after = [], []
    opt.register_step_pre_hook(_grad_probe(mgr, before))  # runs before the manager's hook ...
    mgr.attach(opt)
    opt.register_step_pre_hook(_grad_probe(mgr, after))  # ... and this one after it
    _train(model, opt, _batches(6))

    assert mgr.step == 6
    assert all(v > 0 for rec in before for v in rec.values()), "the probe must see real non-TRAIN gradients"
    assert all(v == 0.0 for rec in after for v in rec.values()), "non-TRAIN gradients reach the optimizer"
    params = dict(model.named_parameters())
    for ps in mgr.state:
        w, init = params[ps.name].detach().reshape(-1), w0[ps.name].reshape(-1)
        assert _is_plus_zero(w[ps.prune_mask()]), ps.name
        assert torch.equal(w[ps.freeze_mask()], init[ps.freeze_mask()]), ps.name
        assert bool((w[ps.train] != init[ps.train]).all()), f"{ps.name}: TRAIN entries must train"
        n_frozen = int(ps.freeze_mask().sum())
        assert (n_frozen > 0) == (method == "random_freeze")
    assert not torch.equal(params["0.bias"], w0["0.bias"])  # unmanaged parameters train normally


def test_optimizer_state_loaded_from_elsewhere_gets_the_managers_masks_back():
    model = mlp()
    mgr = DimRedManager(recipe("random_freeze", 0.6, "erk"), model).prepare()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = CompactAdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    mgr.attach(opt)
    _train(model, opt, _batches(2))
    # a state dict from an optimizer that trains everything (another run, a dense checkpoint)
    foreign = CompactAdamW(mlp().parameters(), lr=0.05, weight_decay=0.1)
    opt.load_state_dict(foreign.state_dict())
    assert all(opt.train_mask(p) is None for p in model.parameters())
    _train(model, opt, _batches(2, seed=1))
    params = dict(model.named_parameters())
    for ps in mgr.state:
        assert torch.equal(opt.train_mask(params[ps.name]).reshape(ps.train.shape), ps.train), ps.name
        w = params[ps.name].detach().reshape(-1)
        assert _is_plus_zero(w[ps.prune_mask()]), ps.name
        assert torch.equal(w[ps.freeze_mask()], w0[ps.name].reshape(-1)[ps.freeze_mask()]), ps.name


def test_no_copy_of_frozen_values_with_a_compact_optimizer():
    model = mlp()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    mgr = DimRedManager(recipe("random_freeze", 0.8, "erk"), model).prepare()
    assert mgr._frozen, "a plain manager keeps the values it restores"
    opt = CompactAdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    mgr.attach(opt)
    assert mgr._frozen == {}, "the compact optimizer never writes FREEZE entries: no copy needed"
    _train(model, opt, _batches(3))
    # another optimizer later: the values are captured again, from weights that never moved
    mgr.detach()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    mgr.attach(sgd)
    assert mgr._frozen
    _train(model, sgd, _batches(3, seed=2))
    params = dict(model.named_parameters())
    for ps in mgr.state:
        f = ps.freeze_mask()
        assert int(f.sum()) > 0
        assert torch.equal(params[ps.name].detach().reshape(-1)[f], w0[ps.name].reshape(-1)[f]), ps.name


def test_metrics():
    model = mlp()
    mgr = DimRedManager(recipe("random_freeze", 0.6, "erk"), model).prepare()
    m = mgr.metrics()
    names = list(mgr.views)
    required = {f"dimred/density/{n}" for n in names} | {
        "dimred/density", "dimred/fraction/train", "dimred/fraction/freeze", "dimred/fraction/prune",
        "dimred/topology_update_seconds",
    }
    assert required <= set(m), sorted(required - set(m))
    assert all(k.startswith("dimred/") and isinstance(v, float) for k, v in m.items())  # flat, tracker-ready
    for n in names:
        assert m[f"dimred/density/{n}"] == 1.0
        if f"dimred/train_fraction/{n}" in m:
            assert m[f"dimred/train_fraction/{n}"] == pytest.approx(mgr.ctx.keep_counts[n] / mgr.views[n].numel)
    total = sum(v.numel for v in mgr.views.values())
    n_train = sum(mgr.ctx.keep_counts.values())
    assert m["dimred/density"] == 1.0 and m["dimred/fraction/prune"] == 0.0  # freezing keeps every value
    assert m["dimred/fraction/train"] == pytest.approx(n_train / total)
    assert m["dimred/fraction/freeze"] == pytest.approx(1 - n_train / total)
    assert m["dimred/topology_update_seconds"] >= 0.0

    pruned = DimRedManager(recipe("magnitude", 0.6, "erk"), mlp()).prepare()
    pm = pruned.metrics()
    for n, v in pruned.views.items():
        assert pm[f"dimred/density/{n}"] == pytest.approx(pruned.ctx.keep_counts[n] / v.numel)
    assert pm["dimred/density"] == pytest.approx(sum(pruned.ctx.keep_counts.values()) / total)
    assert pm["dimred/fraction/prune"] == pytest.approx(1 - pm["dimred/density"])
    assert {k: c.tolist() for k, c in pruned.global_counts().items()} == {
        n: [pruned.ctx.keep_counts[n], 0, v.numel - pruned.ctx.keep_counts[n]] for n, v in pruned.views.items()
    }
    assert sorted(ElementState) == [ElementState.TRAIN, ElementState.FREEZE, ElementState.PRUNE]


@pytest.mark.parametrize("method", ["random", "random_freeze"])
def test_state_dict_round_trip(method):
    model_a = mlp(seed=0)
    mgr_a = DimRedManager(recipe(method, 0.7, "erk", seed=1), model_a).prepare()
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=0.05, weight_decay=0.1)
    mgr_a.attach(opt_a)
    _train(model_a, opt_a, _batches(3))
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "dimred": mgr_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)

    model_b = mlp(seed=5)  # other weights, other seed: other masks until the checkpoint is loaded
    mgr_b = DimRedManager(recipe(method, 0.7, "erk", seed=2), model_b).prepare()
    assert any(not torch.equal(mgr_b.state[n].train, mgr_a.state[n].train) for n in mgr_a.views)
    model_b.load_state_dict(ckpt["model"])
    mgr_b.load_state_dict(ckpt["dimred"])
    assert mgr_b.step == 3
    ref = masks(mgr_a)
    assert all(torch.equal(mgr_b.state[n].keep, ref[n][0]) and torch.equal(mgr_b.state[n].train, ref[n][1]) for n in ref)

    frozen_values = {ps.name: dict(model_b.named_parameters())[ps.name].detach().reshape(-1)[ps.freeze_mask()].clone()
                     for ps in mgr_b.state}
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=0.05, weight_decay=0.1)
    mgr_b.attach(opt_b)
    _train(model_b, opt_b, _batches(3, seed=1))
    assert mgr_b.step == 6
    params = dict(model_b.named_parameters())
    for ps in mgr_b.state:
        w = params[ps.name].detach().reshape(-1)
        assert _is_plus_zero(w[ps.prune_mask()])
        assert torch.equal(w[ps.freeze_mask()], frozen_values[ps.name])


def test_load_state_dict_rejects_a_different_model():
    mgr = DimRedManager(recipe("random", 0.5), mlp()).prepare()
    other = DimRedManager(recipe("random", 0.5), nn.Sequential(nn.Linear(12, 16))).prepare()
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict(mgr.state_dict())
    with pytest.raises(ValueError, match="keeps no state"):
        mgr.load_state_dict({**mgr.state_dict(), "method": {"x": 1}})


def test_removed_hooks_stop_enforcement():
    model = mlp()
    mgr = DimRedManager(recipe("random", 0.7), model).prepare()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    mgr.attach(opt)
    mgr.detach()
    _train(model, opt, _batches(2))
    assert mgr.step == 0
    assert not _is_plus_zero(model[0].weight.detach().reshape(-1)[mgr.state["0.weight"].prune_mask()])


def test_use_before_prepare_and_bad_arguments():
    mgr = DimRedManager(recipe("random", 0.5), mlp())
    with pytest.raises(RuntimeError, match=r"prepare\(\) has not been called"):
        _ = mgr.state
    with pytest.raises(RuntimeError, match=r"prepare\(\) has not been called"):
        mgr.attach(torch.optim.SGD(mlp().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="total_steps must be >= 0"):
        DimRedManager(recipe("random", 0.5), mlp(), total_steps=-1)


def test_sparsity_zero_changes_nothing():
    model = mlp()
    w0 = [p.detach().clone() for p in model.parameters()]
    mgr = DimRedManager(recipe("magnitude", 0.0), model).prepare()
    assert all(bool(ps.train.all()) for ps in mgr.state)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert mgr.metrics()["dimred/density"] == 1.0


# ---- real DDP ----------------------------------------------------------------------------------

def _ddp_worker(rank: int, world_size: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for method in ("random", "random_freeze"):
        model = mlp(seed=0)
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        mgr = DimRedManager(recipe(method, 0.7, "erk"), model).prepare()  # adapter from Topology.detect()
        ddp = DDP(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=0.05, weight_decay=0.1)
        mgr.attach(opt)
        probe: list = []
        opt.register_step_pre_hook(_grad_probe(mgr, probe))
        _train(ddp, opt, _batches(5, seed=100 + rank))  # each rank its own data
        out[method] = {
            "w0": w0, "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "masks": masks(mgr), "step": mgr.step, "probe": probe, "keep_counts": mgr.ctx.keep_counts,
            "metrics": mgr.metrics(), "world_size": mgr.adapter.topology.world_size,
        }
        mgr.check_agreement()
    return out


@pytest.mark.distributed
def test_ddp_two_ranks():
    results = run_distributed(_ddp_worker, 2)
    for method in ("random", "random_freeze"):
        r0, r1 = results[0][method], results[1][method]
        assert r0["step"] == r1["step"] == 5 and r0["world_size"] == 2
        for n, (keep, train) in r0["masks"].items():
            assert torch.equal(keep, r1["masks"][n][0]) and torch.equal(train, r1["masks"][n][1]), n
            assert int(train.sum()) == r0["keep_counts"][n], f"{n}: kept count on a DDP replica"
        for n in r0["weights"]:
            assert torch.equal(r0["weights"][n], r1["weights"][n]), f"replicas diverged on {n}"
        for res in (r0, r1):
            assert all(v == 0.0 for rec in res["probe"] for v in rec.values())
            for n, (keep, train) in res["masks"].items():
                w, init = res["weights"][n].reshape(-1), res["w0"][n].reshape(-1)
                assert _is_plus_zero(w[~keep]), n
                assert torch.equal(w[keep & ~train], init[keep & ~train]), n
                assert bool((w[train] != init[train]).all()), n
                # replicated counts are not double-counted across ranks
                assert res["metrics"][f"dimred/density/{n}"] == pytest.approx(float(keep.sum()) / keep.numel())
