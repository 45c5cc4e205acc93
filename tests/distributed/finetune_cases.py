"""Workers of the sparse fine-tuning tests under real DeepSpeed ZeRO engines (dist_harness processes).

SpIEL trains 12 steps on every stage; each rank records, per accumulation window and update, what a
one-process replay needs: the gradients and candidates of the window's first step, and the weights,
pretrained values, candidates, gradient sums and masks before and after each update.
"""

from __future__ import annotations

from typing import Any

import torch

import dimred_dist as dd
from tests.distributed.lottery_cases import _step
from tests.zero_utils import Net, build_engine, ds_config, full_module_params, init_deepspeed, make_model, run_scenarios

T = 12
SCHEDULE = {"kind": "periodic", "interval": 4, "offset": 2, "drop_fraction": 0.5, "decay": "linear",
            "end_fraction": 1.0, "first_drop_fraction": 1.0, "skip_step": False}


def recipe() -> dd.Recipe:
    return dd.load_recipe({"allow_empty_layers": True,
        "method": "spiel", "sparsity": 0.7, "distribution": "uniform", "seed": 3,
                           "targets": {"biases": True}, "schedule": SCHEDULE, "args": {"accumulation_steps": 2}})


def _local(mgr, fn) -> dict[str, tuple[int, int, torch.Tensor]]:
    return {n: (v.start, v.end, fn(n, v)) for n, v in mgr.views.items()}


def spiel(stage: int, precision: str) -> dict[str, Any]:
    from dimred_dist.distributed.zero import ZeroAdapter
    from dimred_dist.optim import CompactAdamW

    model = make_model(Net)
    engine = build_engine(model, ds_config(stage, precision), CompactAdamW(model.parameters(), lr=0.01))
    mgr = dd.DimRedManager(recipe(), engine.module, adapter=ZeroAdapter(engine), total_steps=T).prepare()
    mgr.attach(engine)
    m = mgr.method
    out: dict[str, Any] = {"windows": [], "updates": [], "initial": full_module_params(engine)}
    orig_observe, orig_update = m.observe, m.update

    def observe(ctx, step):
        opening = not m.cand
        orig_observe(ctx, step)
        if opening and m.cand:
            out["windows"].append({
                "step": step, "grad": _local(mgr, lambda n, v: v.grad().detach().float().clone()),
                "train": _local(mgr, lambda n, v: ctx.state[n].train.clone()),
                "cand": _local(mgr, lambda n, v: m.grow_candidates(v, ctx, step).clone())})

    def update(ctx, step):
        if not m.cand or not m.schedule.is_update_step(step, ctx.total_steps):
            return orig_update(ctx, step)
        tensors = m.tensor_state()
        before = {"weight": _local(mgr, lambda n, v: v.weight().detach().clone()),
                  "train": _local(mgr, lambda n, v: ctx.state[n].train.clone()),
                  **{k: _local(mgr, lambda n, v, k=k: tensors[k][n].clone()) for k in tensors}}
        result = orig_update(ctx, step)
        out["updates"].append({"step": step, "result": result, "before": before,
                               "weight": _local(mgr, lambda n, v: v.weight().detach().clone()),
                               "train": _local(mgr, lambda n, v: ctx.state[n].train.clone())})
        return result

    m.observe, m.update = observe, update
    for t in range(T):
        _step(engine, model, t, precision)
    out["final"] = full_module_params(engine)
    out["codes"] = _local(mgr, lambda n, v: mgr.state[n].codes().clone())
    out["history"] = mgr.topology_history
    out["state_bytes"] = mgr.metrics().get("dimred/optimizer/state_bytes")
    return out


T_FREEZE = 8


def freezeout_recipe() -> dd.Recipe:
    """l1 (weight and bias, 264 entries) freezes before step 4, tiny before step 6; l2 trains on."""
    return dd.load_recipe({"allow_empty_layers": True,
        "method": "freezeout", "sparsity": 0.0, "targets": {"biases": True},
                           "args": {"groups": ["^l1\\.", "^tiny\\."], "t0": 0.5, "scale": "linear"}})


def freezeout(stage: int, precision: str) -> dict[str, Any]:
    """Progressive freezing: the optimizer bytes of this rank after every step, the module weights after
    every step, the history with the released bytes, the final state codes."""
    from dimred_dist.distributed.zero import ZeroAdapter
    from dimred_dist.optim import CompactAdamW

    model = make_model(Net)
    engine = build_engine(model, ds_config(stage, precision), CompactAdamW(model.parameters(), lr=0.01))
    mgr = dd.DimRedManager(freezeout_recipe(), engine.module, adapter=ZeroAdapter(engine),
                           total_steps=T_FREEZE).prepare()
    mgr.attach(engine)
    out: dict[str, Any] = {"bytes": [mgr.optimizer.state_bytes()], "weights": []}
    for t in range(T_FREEZE):
        _step(engine, model, t, precision)
        out["bytes"].append(mgr.optimizer.state_bytes())
        out["weights"].append(full_module_params(engine))
    out["history"] = mgr.topology_history
    out["codes"] = _local(mgr, lambda n, v: mgr.state[n].codes().clone())
    out["metrics"] = mgr.metrics()
    return out


def worker(rank: int, world: int, precision: str):
    init_deepspeed()
    return run_scenarios({**{f"spiel{s}": (lambda s=s: spiel(s, precision)) for s in (1, 2, 3)},
                          **{f"freezeout{s}": (lambda s=s: freezeout(s, precision)) for s in (1, 2, 3)}})
