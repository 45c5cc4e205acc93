"""Workers and helpers of tests/distributed/test_checkpoint.py (run inside dist_harness processes).

* :class:`SliceAdapter`: every parameter split into arbitrary contiguous per-rank ranges (not
  multiples of 8, some empty), plain torch: exercises the reassembly of any layout cheaply;
* :func:`scribble`: overwrite the masks with a pattern that depends only on the global index, so a
  load that merely re-derived the initial topology would be caught;
* workers that save and load through real DeepSpeed ZeRO-1/2/3 engines.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

import dimred_dist as dd
from dimred_dist.core.registry import register_method
from dimred_dist.distributed.checkpoint import CheckpointError, load_dimred_state, save_dimred_state
from dimred_dist.distributed.topology import Topology
from dimred_dist.distributed.views import ShardView
from dimred_dist.methods.static import RandomPruning
from tests.zero_utils import Net, build_engine, init_deepspeed, make_model


def recipe(method: str = "rigl") -> dd.Recipe:
    args = {"update_interval": 2} if method in ("rigl", "set") else {}
    return dd.load_recipe({"allow_empty_layers": True,
        "method": method, "sparsity": 0.7, "distribution": "uniform", "args": args})


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 29), nn.ReLU(), nn.Linear(29, 7), nn.ReLU(), nn.Linear(7, 3))


# ---- an adapter with arbitrary ranges ---------------------------------------------------------
class SliceView(ShardView):
    def __init__(self, name: str, param: nn.Parameter, start: int, end: int) -> None:
        super().__init__(name, tuple(param.shape), start, end, replicated=False)
        self.param = param

    def weight(self) -> torch.Tensor:
        return self.param.data.view(-1)[self.start : self.end]

    def grad(self) -> torch.Tensor | None:
        return None if self.param.grad is None else self.param.grad.view(-1)[self.start : self.end]


class SliceAdapter:
    """Rank r owns ``[cuts[r] * numel // cuts[-1], cuts[r+1] * numel // cuts[-1])`` of every parameter."""

    def __init__(self, cuts: list[int]) -> None:
        self.cuts = cuts
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        assert len(cuts) == world + 1
        self.topology = Topology(rank, world, zero_stage=1)
        self.collectives = self.check_collectives = self.topology.collectives()

    def views(self, params):
        r, c = self.topology.rank, self.cuts
        out = {}
        for n, p in params.items():
            numel = p.numel()
            out[n] = SliceView(n, p, c[r] * numel // c[-1], c[r + 1] * numel // c[-1])
        return out

    def weights_edited(self) -> None:
        pass


def scribble(manager) -> None:
    """keep / train from a hash of the global index: FREEZE and PRUNE entries everywhere."""
    for name, v in manager.views.items():
        idx = torch.arange(v.start, v.end, dtype=torch.int64) + len(name)
        h = (idx * 2654435761) % 1000003
        manager.state[name].set_masks(h % 3 != 0, (h % 3 != 0) & (h % 5 != 0))
    manager.step = 7


def local(manager) -> dict:
    return {n: (v.start, v.end, manager.state[n].keep.clone(), manager.state[n].train.clone())
            for n, v in manager.views.items()}


def sliced_save(rank: int, world: int, cuts: list[int], directory: str) -> dict:
    mgr = dd.DimRedManager(recipe(), mlp(), adapter=SliceAdapter(cuts), total_steps=20).prepare()
    scribble(mgr)
    save_dimred_state(mgr, directory)
    return local(mgr)


def sliced_load(rank: int, world: int, cuts: list[int], directory: str) -> dict:
    mgr = dd.DimRedManager(recipe(), mlp(seed=1), adapter=SliceAdapter(cuts), total_steps=20).prepare(resuming=True)
    before = local(mgr)
    try:
        load_dimred_state(mgr, directory)
    except CheckpointError as e:
        unchanged = all(torch.equal(before[n][2], a[2]) and torch.equal(before[n][3], a[3])
                        for n, a in local(mgr).items())
        return {"error": str(e), "unchanged": unchanged}
    return {"masks": local(mgr), "step": mgr.step}


# ---- method tensor state ---------------------------------------------------------------------
def tensor_values(name: str, start: int, end: int) -> dict[str, torch.Tensor]:
    """Values that depend only on the global index: a load that put a slice in the wrong place shows."""
    idx = torch.arange(start, end, dtype=torch.int64)
    return {"snap": idx.to(torch.float32) * 0.5 + len(name), "flag": (idx + len(name)) % 3 == 0}


@register_method("test_tensor_state")
class TensorStateMethod(RandomPruning):
    """Random pruning plus tensor state over every trainable parameter (managed or not)."""

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.ctx = ctx
        self.loaded: dict = {}

    def tensor_state(self):
        out: dict = {"snap": {}, "flag": {}}
        for n, v in self.ctx.trainable_views().items():
            for k, t in tensor_values(n, v.start, v.end).items():
                out[k][n] = t
        return out

    def load_tensor_state(self, tensors) -> None:
        self.loaded = tensors


def tensor_save(rank: int, world: int, cuts: list[int], directory: str) -> None:
    mgr = dd.DimRedManager(recipe("test_tensor_state"), mlp(), adapter=SliceAdapter(cuts)).prepare()
    save_dimred_state(mgr, directory)


def tensor_load(rank: int, world: int, cuts: list[int], directory: str) -> dict:
    mgr = dd.DimRedManager(recipe("test_tensor_state"), mlp(1), adapter=SliceAdapter(cuts)).prepare(resuming=True)
    load_dimred_state(mgr, directory)
    ranges = {n: (v.start, v.end) for n, v in mgr.ctx.trainable_views().items()}
    return {"loaded": mgr.method.loaded, "ranges": ranges}


def assemble(pieces: list[tuple[int, int, torch.Tensor]], numel: int) -> torch.Tensor:
    """A full flat tensor from ``(start, end, local)`` pieces that must cover ``0 .. numel-1`` exactly once."""
    covered = torch.zeros(numel, dtype=torch.int64)
    full = torch.zeros(numel, dtype=pieces[0][2].dtype)
    for start, end, t in pieces:
        full[start:end] = t
        covered[start:end] += 1
    assert bool((covered == 1).all()), "the ranks' ranges do not tile the parameter"
    return full


# ---- real DeepSpeed engines -------------------------------------------------------------------
def net(seed: int = 0) -> Net:
    """tiny (1 element: one rank owns none of it) -> 7 -> 33 -> 5, odd sizes."""
    return make_model(Net, seed)


def _engine_manager(stage: int, seed: int, resuming: bool):
    from dimred_dist.distributed.zero import ZeroAdapter

    init_deepspeed()
    model = net(seed)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True,
           "steps_per_print": 10**9,
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 5e5, "allgather_bucket_size": 5e5,
                                 "stage3_param_persistence_threshold": 10, "sub_group_size": 100}}
    engine = build_engine(model, cfg)
    mgr = dd.DimRedManager(recipe(), engine.module, adapter=ZeroAdapter(engine), total_steps=20)
    mgr.prepare(resuming=resuming)
    return engine, mgr


def zero_save(rank: int, world: int, stage: int, directory: str, steps: int) -> dict:
    """Train ``steps`` RigL steps under ZeRO-``stage`` and save; return local masks and the step."""
    engine, mgr = _engine_manager(stage, 0, False)
    mgr.attach(engine)
    for t in range(steps):
        g = torch.Generator().manual_seed(1000 * t + rank)
        loss = nn.functional.mse_loss(engine(torch.randn(2, 7, generator=g)), torch.randn(2, 5, generator=g))
        engine.backward(loss)
        engine.step()
    save_dimred_state(mgr, directory)
    return {"masks": local(mgr), "step": mgr.step, "churn": mgr.metrics().get("dimred/churn", 0.0)}


def zero_load(rank: int, world: int, plans: list[tuple[int, str]]) -> list[dict]:
    """For each (stage, directory): a fresh ZeRO-``stage`` engine resumes the topology saved there."""
    out = []
    for stage, directory in plans:
        engine, mgr = _engine_manager(stage, 1, True)
        load_dimred_state(mgr, directory)
        mgr.attach(engine)
        pruned = max(float(v.weight()[~mgr.state[n].keep].abs().sum()) for n, v in mgr.views.items())
        out.append({"masks": local(mgr), "step": mgr.step, "pruned_abs_sum": pruned})
    return out


# ---- optimizer moments across layouts ------------------------------------------------------------
MOMENT_STEPS, MORE_STEPS = 5, 3


def moment_batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``t``'s batch, the same on every rank: the averaged gradient is the one of a single process."""
    g = torch.Generator().manual_seed(500 + t)
    return torch.randn(2, 7, generator=g), torch.randn(2, 5, generator=g)


def _moment_engine(stage: int, weights: dict | None):
    from dimred_dist.distributed.zero import ZeroAdapter
    from tests.zero_utils import ds_config

    init_deepspeed()
    model = net(0)
    if weights is not None:
        model.load_state_dict(weights)
    engine = build_engine(model, ds_config(stage, clip=0.0))
    mgr = dd.DimRedManager(recipe(), engine.module, adapter=ZeroAdapter(engine), total_steps=20)
    mgr.prepare(resuming=weights is not None)
    return engine, mgr


def _engine_steps(engine, first: int, n: int) -> list[float]:
    losses = []
    for t in range(first, first + n):
        x, y = moment_batch(t)
        loss = nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def moments_zero_save(rank: int, world: int, stage: int, directory: str) -> dict:
    """ZeRO-``stage``: train, save the dimred state and the full weights, then train on (the reference)."""
    engine, mgr = _moment_engine(stage, None)
    mgr.attach(engine)
    _engine_steps(engine, 0, MOMENT_STEPS)
    save_dimred_state(mgr, directory)
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in engine.module.named_parameters()}, f"{directory}/weights.pt")
    dist.barrier()
    return {"losses": _engine_steps(engine, MOMENT_STEPS, MORE_STEPS)}


def moments_zero_load(rank: int, world: int, stage: int, directory: str) -> dict:
    """ZeRO-``stage``: resume the weights and the dimred state (moments included) saved elsewhere, train on."""
    engine, mgr = _moment_engine(stage, torch.load(f"{directory}/weights.pt", weights_only=True))
    load_dimred_state(mgr, directory)
    mgr.attach(engine)
    return {"losses": _engine_steps(engine, MOMENT_STEPS, MORE_STEPS), "step": mgr.step}


def plain_steps(model, opt, first: int, n: int) -> list[float]:
    losses = []
    for t in range(first, first + n):
        x, y = moment_batch(t)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
