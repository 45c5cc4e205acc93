"""The method lifecycle in a plain training loop: hook order, skipped steps, moment resets, schedules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dimred_dist
from dimred_dist import DimRedManager
from dimred_dist.core.registry import register_method
from dimred_dist.core.state import ElementState
from dimred_dist.distributed.adapter import ReplicatedAdapter
from dimred_dist.distributed.protocol import ShardAdapter
from dimred_dist.methods.static import MagnitudePruning
from tests.models import mlp


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _rigl(**schedule) -> dimred_dist.Recipe:
    return dimred_dist.load_recipe({
        "method": "rigl", "sparsity": 0.7, "distribution": "uniform", "seed": 1,
        "schedule": {"kind": "periodic", "interval": 3, "drop_fraction": 0.5, "end_fraction": 1.0, **schedule},
    })


def test_adapters_implement_the_protocol():
    assert isinstance(ReplicatedAdapter(), ShardAdapter)


@register_method("test_hook_order")
class _Recorder(MagnitudePruning):
    """Records every hook call (a test method: magnitude scores on any schedule)."""

    calls: list = []
    #: Per observe: |g| summed over the pruned entries of 0.weight (dense gradients before masking).
    pruned_grad: list = []

    def observe(self, ctx, step):
        g = ctx.views["0.weight"].grad()
        self.calls.append(("observe", step, g is not None))
        self.pruned_grad.append(float(g[~ctx.state["0.weight"].keep].abs().sum()))
        super().observe(ctx, step)

    def update(self, ctx, step):
        out = super().update(ctx, step)
        self.calls.append(("update", step, out is not None))
        return out

    def after_step(self, ctx, step):
        self.calls.append(("after_step", step))
        return super().after_step(ctx, step)


def test_hooks_run_in_order_once_per_step():
    model = mlp()
    r = dimred_dist.load_recipe({"method": "test_hook_order", "sparsity": 0.5, "distribution": "uniform",
                                 "schedule": {"kind": "one_shot", "at_step": 2}})
    mgr = DimRedManager(r, model, total_steps=4).prepare()
    _Recorder.calls = []
    assert all(bool(ps.keep.all()) for ps in mgr.state), "one_shot at step 2: dense until then"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr.attach(opt, pre_step=False)
    for x, y in _batches(4):
        F.cross_entropy(model(x), y).backward()
        mgr.before_optimizer_step()  # before clipping; the pre-hook then finds the step done
        opt.step()
        opt.zero_grad()
    expected = []
    for t in range(4):
        expected += [("observe", t, True), ("update", t, t == 2), ("after_step", t)]
    assert _Recorder.calls == expected
    assert [h["step"] for h in mgr.topology_history] == [2], "only real topology changes are logged"
    assert all(not bool(ps.keep.all()) for ps in mgr.state)


def test_update_step_applies_no_optimizer_step():
    """RigL's rule: on an update step the optimizer leaves weights, moments and step counts alone; the
    LR schedule still advances. With ``skip_step: false`` the step is applied."""
    for skip in (True, False):
        model = mlp()
        mgr = DimRedManager(_rigl(skip_step=skip), model, total_steps=12).prepare()
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        mgr.attach(opt, lr_scheduler=sched)
        params = dict(model.named_parameters())
        for t, (x, y) in enumerate(_batches(5)):
            F.cross_entropy(model(x), y).backward()
            w0 = {n: p.detach().clone() for n, p in params.items()}
            steps0 = {n: float(opt.state[p]["step"]) for n, p in params.items() if opt.state.get(p)}
            opt.step()
            sched.step()
            opt.zero_grad()
            if t == 3:  # the first update (interval 3)
                assert mgr.topology_history[-1]["step"] == 3
                unmanaged = "0.bias"
                assert torch.equal(params[unmanaged], w0[unmanaged]) == skip, "unmanaged parameters skip too"
                if skip:
                    assert {n: float(opt.state[p]["step"]) for n, p in params.items()} == steps0
                    for ps in mgr.state:
                        n = ps.name
                        w, before = params[n].detach().reshape(-1), w0[n].reshape(-1)
                        both = ps.keep & before.ne(0)
                        assert torch.equal(w[both], before[both]), f"{n}: survivors moved on a skipped step"
        assert mgr.step == 5
        assert sched.last_epoch == 5, "the LR schedule advances on a skipped step"


def test_regrown_entries_restart_torch_adamw_moments():
    """Entries that were TRAIN, were dropped and come back later have stale Adam moments unless reset."""
    model = mlp()
    mgr = DimRedManager(_rigl(), model, total_steps=30).prepare()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    mgr.attach(opt)
    params = dict(model.named_parameters())
    stale_reset = 0
    orig_sync = mgr.sync_optimizer

    def sync(resets=None):
        nonlocal stale_reset
        before = {n: opt.state[params[n]]["exp_avg"].reshape(-1).clone() for n in (resets or {})
                  if opt.state.get(params[n])}
        orig_sync(resets)
        for n, mask in (resets or {}).items():
            if n in before:
                st = opt.state[params[n]]
                stale_reset += int((before[n][mask] != 0).sum())
                assert bool((st["exp_avg"].reshape(-1)[mask] == 0).all()), n
                assert bool((st["exp_avg_sq"].reshape(-1)[mask] == 0).all()), n

    mgr.sync_optimizer = sync
    for x, y in _batches(30):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert len(mgr.topology_history) >= 5
    assert stale_reset > 0, "some regrown entries had stale moments (the test must be able to fail)"


def test_an_optimizer_whose_state_is_unknown_is_refused_at_attach():
    model = mlp()
    mgr = DimRedManager(_rigl(), model, total_steps=30).prepare()
    with pytest.raises(TypeError, match="cannot restart the state of a Adagrad"):
        mgr.attach(torch.optim.Adagrad(model.parameters()))
    static = DimRedManager(dimred_dist.load_recipe({"method": "random", "sparsity": 0.5}), mlp()).prepare()
    static.attach(torch.optim.Adagrad(static.model.parameters()))  # a static topology resets nothing


def test_gradual_magnitude_pruning_follows_the_cubic_schedule():
    model = mlp()
    r = dimred_dist.load_recipe({"method": "magnitude", "sparsity": 0.8, "distribution": "uniform",
                                 "schedule": {"kind": "cubic", "interval": 2, "end_fraction": 0.6}})
    mgr = DimRedManager(r, model, total_steps=10).prepare()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mgr.attach(opt)
    densities = {}
    for t, (x, y) in enumerate(_batches(10)):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        densities[t] = mgr.metrics()["dimred/density"]
    hist = [h["step"] for h in mgr.topology_history]
    assert hist == [2, 4, 6]
    for h in mgr.topology_history:
        assert h["target_density"] == pytest.approx(1 - (0.8 - 0.8 * (1 - h["step"] / 6) ** 3))
    assert densities[9] == pytest.approx(0.2, abs=0.01) and densities[1] == 1.0
    assert densities[2] > densities[4] > densities[6]
    for ps in mgr.state:
        w = dict(model.named_parameters())[ps.name].detach().reshape(-1)
        assert bool((w[~ps.keep] == 0).all())


def test_freezing_methods_move_entries_to_freeze():
    """A FREEZE method on a pruning schedule freezes progressively (nothing is pruned)."""
    r = dimred_dist.load_recipe({"method": "random_freeze", "sparsity": 0.5, "distribution": "uniform",
                                 "schedule": {"kind": "cubic", "interval": 1, "end_fraction": 0.5}})
    mgr = DimRedManager(r, mlp(), total_steps=4).prepare()
    ctx = mgr.ctx
    assert all(bool(ps.train.all()) for ps in mgr.state)
    mgr.method.update(ctx, 2)
    for ps in mgr.state:
        c = ps.counts()
        assert c[ElementState.PRUNE] == 0 and c[ElementState.FREEZE] == ps.numel - ctx.keep_counts[ps.name]


def test_budgets_at_any_density():
    mgr = DimRedManager(dimred_dist.load_recipe({"method": "random", "sparsity": 0.5, "distribution": "uniform"}),
                        mlp()).prepare()
    assert mgr.ctx.budgets(0.5) == mgr.ctx.keep_counts
    assert mgr.ctx.budgets(0.25) == {"0.weight": 48, "2.weight": 32, "4.weight": 6}  # 0.25 of 192, 128, 24
    assert mgr.ctx.budgets(1.0) == {"0.weight": 192, "2.weight": 128, "4.weight": 24}


def test_methods_see_dense_gradients_in_observe():
    """observe gets the gradient before masking: pruned entries still have theirs; the optimizer does not."""
    model = mlp()
    r = dimred_dist.load_recipe({"method": "test_hook_order", "sparsity": 0.5, "distribution": "uniform"})
    mgr = DimRedManager(r, model).prepare()
    _Recorder.pruned_grad = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr.attach(opt)
    for x, y in _batches(2):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert float(model[0].weight.grad.reshape(-1)[~mgr.state["0.weight"].keep].abs().sum()) == 0.0
        opt.zero_grad()
    assert len(_Recorder.pruned_grad) == 2 and all(v > 0 for v in _Recorder.pruned_grad)


def test_tensor_state_needs_a_trainable_parameter():
    mgr = DimRedManager(dimred_dist.load_recipe({"method": "random", "sparsity": 0.5}), mlp()).prepare()
    views = mgr.ctx.trainable_views()
    assert list(views) == [n for n, _ in mgr.model.named_parameters()], "every trainable parameter, model order"
    assert views["0.weight"] is mgr.views["0.weight"]
    with pytest.raises(KeyError, match="no trainable parameter named 'nope'"):
        mgr.ctx.view_of("nope")
    frozen = mlp()
    frozen[0].bias.requires_grad_(False)
    m2 = DimRedManager(dimred_dist.load_recipe({"method": "random", "sparsity": 0.5}), frozen).prepare()
    assert "0.bias" not in m2.ctx.trainable_views()
