"""Workers of the IMP tests under real DeepSpeed ZeRO engines (run inside dist_harness processes)."""

from __future__ import annotations

from typing import Any

import torch

import dimred_dist as dd
from dimred_dist.distributed.checkpoint import load_dimred_state, save_dimred_state
from tests.zero_utils import (
    Net,
    batch,
    build_engine,
    ds_config,
    full_module_params,
    init_deepspeed,
    make_model,
    run_scenarios,
)

L, K, T = 3, 1, 9  # steps per segment, rewind step, planned steps: rounds before steps 3 and 6


def recipe() -> dd.Recipe:
    return dd.load_recipe({"allow_empty_layers": True,
        "method": "imp", "sparsity": 0.75, "distribution": "uniform", "seed": 0,
                           "targets": {"biases": True},
                           "schedule": {"kind": "imp", "rounds": 2, "round_steps": L, "rewind_step": K}})


def _masters(mgr) -> dict[str, tuple[int, int, torch.Tensor]]:
    return {n: (v.start, v.end, v.weight().detach().clone()) for n, v in mgr.ctx.trainable_views().items()}


def _step(engine, model, t: int, precision: str) -> None:
    x, y = batch(model, t, 0, torch.distributed.get_rank(), precision)
    engine.backward(torch.nn.functional.mse_loss(engine(x).float(), y))
    engine.step()


def _engine(stage: int, precision: str, resuming: bool = False, seed: int = 0):
    from dimred_dist.distributed.zero import ZeroAdapter

    model = make_model(Net, seed)
    engine = build_engine(model, ds_config(stage, precision))
    mgr = dd.DimRedManager(recipe(), engine.module, adapter=ZeroAdapter(engine), total_steps=T)
    mgr.prepare(resuming=resuming)
    return model, engine, mgr


def rounds(stage: int, precision: str) -> dict[str, Any]:
    """Train through both rounds; the masters after step K, after each round-end step, and the masks."""
    model, engine, mgr = _engine(stage, precision)
    mgr.attach(engine)
    out: dict[str, Any] = {"after": {}, "keep": {}, "module": {}, "updates": []}
    orig_update = mgr.method.update

    def update(ctx, step):  # the inputs and outputs of each round's pruning, for a one-process replay
        before = {n: (v.start, v.end, v.weight().detach().clone(), ctx.state[n].keep.clone())
                  for n, v in ctx.views.items()}
        result = orig_update(ctx, step)
        if result is not None:
            out["updates"].append({"step": step, "before": before,
                                   "after": {n: ctx.state[n].keep.clone() for n in ctx.views}})
        return result

    mgr.method.update = update
    for t in range(T):
        _step(engine, model, t, precision)
        if t == K - 1:
            out["snapshot"] = _masters(mgr)
        if t in (L, 2 * L):
            out["after"][t] = _masters(mgr)
            out["keep"][t] = {n: mgr.state[n].keep.clone() for n in mgr.views}
            out["module"][t] = full_module_params(engine)
    out["history"] = mgr.topology_history
    out["held"] = {n: t.clone() for n, t in mgr.method.rewinding.snapshot.items()}
    return out


def resume(directory: str, precision: str) -> dict[str, Any]:
    """2 ranks ZeRO-2 save in segment 2 (after step 4); ZeRO-3 engines on the same 2 ranks resume."""
    model, engine, mgr = _engine(2, precision)
    mgr.attach(engine)
    for t in range(L + 2):
        _step(engine, model, t, precision)
    save_dimred_state(mgr, directory)
    saved = {"snapshot": {n: (v.start, v.end, mgr.method.rewinding.snapshot[n].clone())
                          for n, v in mgr.ctx.trainable_views().items()},
             "weights": full_module_params(engine), "step": mgr.step}
    model3, engine3, mgr3 = _engine(3, precision, resuming=True, seed=9)
    engine3.load_module_state_dict({"module": saved["weights"]}, strict=False, fetch_z3_params=True)
    engine3.optimizer.refresh_fp32_params()
    load_dimred_state(mgr3, directory)
    mgr3.attach(engine3)
    loaded = {n: (v.start, v.end, mgr3.method.rewinding.snapshot[n].clone())
              for n, v in mgr3.ctx.trainable_views().items()}
    for t in range(mgr3.step, 2 * L + 1):
        _step(engine3, model3, t, precision)
    return {"dir": directory, "saved": saved, "loaded": loaded, "step_loaded": saved["step"], "after": _masters(mgr3),
            "keep": {n: mgr3.state[n].keep.clone() for n in mgr3.views}, "history": mgr3.topology_history}


def early_bird(stage: int, precision: str) -> dict[str, Any]:
    """Early-bird under ZeRO with a zero learning rate: the weights never move, so the ticket is drawn at
    the fifth draw (steps 0, 2, 4, 6, 8) and is the magnitude mask of the initial weights."""
    from dimred_dist.distributed.zero import ZeroAdapter
    from dimred_dist.optim import CompactAdamW

    model = make_model(Net)
    engine = build_engine(model, ds_config(stage, precision), CompactAdamW(model.parameters(), lr=0.0))
    r = dd.load_recipe({"allow_empty_layers": True, "method": "early_bird", "sparsity": 0.7, "distribution": "global",
                        "args": {"interval": 2, "window": 5, "threshold": 0.1}})
    mgr = dd.DimRedManager(r, engine.module, adapter=ZeroAdapter(engine), total_steps=12).prepare()
    mgr.attach(engine)
    dens = []
    for t in range(10):
        _step(engine, model, t, precision)
        dens.append(mgr.metrics()["dimred/density"])
    return {"history": mgr.topology_history, "density": dens, "metrics": mgr.metrics(),
            "keep": {n: (v.start, v.end, mgr.state[n].keep.clone()) for n, v in mgr.views.items()}}


def worker(rank: int, world: int, precision: str, directory: str):
    init_deepspeed()
    cases = {f"rounds{s}": (lambda s=s: rounds(s, precision)) for s in (1, 2, 3)}
    cases.update({f"early_bird{s}": (lambda s=s: early_bird(s, precision)) for s in (1, 2, 3)})
    cases["resume"] = lambda: resume(directory, precision)
    return run_scenarios(cases)
