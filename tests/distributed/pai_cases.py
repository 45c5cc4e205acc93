"""Workers of the pruning-at-initialization equivalence tests (run inside dist_harness processes).

Every rank probes the same batches; the test process reassembles the ranks' local masks by their
global ranges and compares them with one process running the same recipe on the same model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

import dimred_dist as dd
from tests.zero_utils import (
    Net,
    build_engine,
    ds_config,
    full_module_params,
    gather_objects,
    init_deepspeed,
    low_precision,
    make_model,
    run_scenarios,
    train,
)

#: Method -> its args in these tests (SynFlow in the weights' dtype and GraSP by finite differences,
#: the way they run under ZeRO, so one process computes the same thing; fewer SynFlow rounds).
METHODS: dict[str, dict[str, Any]] = {
    "snip": {"batches": 2},
    "grasp": {"batches": 2, "hvp": "finite_difference", "temperature": 2.0},
    "synflow": {"rounds": 8, "precision": "model"},
    "iter_snip": {"batches": 2, "rounds": 4},
    "force": {"batches": 2, "rounds": 4},
    "freezenet": {"batches": 2, "prune_fraction": 0.2},
    "fish": {"batches": 2},
}


def recipe(method: str) -> dd.Recipe:
    return dd.load_recipe({"method": method, "sparsity": 0.7, "distribution": "global", "seed": 4,
                           "targets": {"biases": True}, "args": METHODS[method]})


def loss_fn(model, batch, temperature: float = 1.0) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x).float() / temperature, y)


def probe_data(precision: str) -> dd.ProbeData:
    g = torch.Generator().manual_seed(11)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    return dd.ProbeData([(torch.randn(4, Net.in_features, generator=g).to(dtype),
                          torch.randn(4, Net.out_features, generator=g)) for _ in range(2)], loss_fn)


def reference_model(precision: str) -> nn.Module:
    """The single-process twin of the engines' model: bf16 weights where the engine's are bf16."""
    model = make_model(Net)
    return model if precision == "fp32" else model.to(torch.bfloat16)


def _ranged(mgr) -> dict[str, tuple[int, int, torch.Tensor]]:
    """Each view's range and state codes (TRAIN 0, FREEZE 1, PRUNE 2: the freezing methods' masks too)."""
    return {n: (v.start, v.end, mgr.state[n].codes()) for n, v in mgr.views.items()}


def zero_case(stage: int, precision: str, method: str) -> dict[str, Any]:
    """Probe through a ZeRO engine; then train 2 steps, beside an engine that loads the same masks
    without probing: their weights must be equal (the probe leaves nothing behind)."""
    from dimred_dist.distributed.zero import ZeroAdapter

    out: dict[str, Any] = {}
    finals = []
    for probe in (True, False):
        model = make_model(Net)
        engine = build_engine(model, ds_config(stage, precision))
        # (ZeRO-3's persistent parameters are empty until first gathered: the initial values come from a twin)
        w0 = {n: p.detach().to(low_precision(precision)) for n, p in make_model(Net).named_parameters()}
        mgr = dd.DimRedManager(recipe(method), engine.module, adapter=ZeroAdapter(engine), total_steps=4)
        if probe:
            mgr.prepare(probe=probe_data(precision))
            out["masks"] = _ranged(mgr)
            state = mgr.state_dict()
            w1 = full_module_params(engine)
            pieces = gather_objects(out["masks"])
            codes = {n: _full_keep([p[n] for p in pieces]) for n in mgr.views}
            full = {n: c != 2 for n, c in codes.items()}
            out["frozen"] = codes
            out["kept_unchanged"] = all(torch.equal(w1[n].reshape(-1)[full[n]], w0[n].reshape(-1)[full[n]])
                                        for n in full)
            out["pruned_zero"] = all(bool((w1[n].reshape(-1)[~full[n]] == 0).all()) for n in full)
            out["unmanaged_unchanged"] = all(torch.equal(w1[n], w0[n]) for n in w0 if n not in mgr.views)
        else:
            mgr.prepare(resuming=True)
            mgr.load_state_dict(state)
        mgr.attach(engine)
        train(engine, model, 2, precision)
        finals.append(full_module_params(engine))
    frozen = {n: c == 1 for n, c in out["frozen"].items()}
    out["frozen_unchanged"] = all(torch.equal(finals[0][n].reshape(-1)[f], w0[n].reshape(-1)[f])
                                  for n, f in frozen.items())
    out["train_equal"] = all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])
    return out


def _full_keep(pieces: list[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
    numel = max(e for _, e, _ in pieces)
    full = torch.zeros(numel, dtype=pieces[0][2].dtype)
    for s, e, k in pieces:
        full[s:e] = k
    return full


def zero_worker(rank: int, world: int, stage: int, precision: str):
    init_deepspeed()
    return run_scenarios({m: (lambda m=m: zero_case(stage, precision, m)) for m in METHODS})


def ddp_worker(rank: int, world: int) -> dict[str, Any]:
    """Replicated (DDP-style) managers: every rank probes the bare module on the same batches."""
    out = {}
    for method in METHODS:
        model = reference_model("fp32")
        mgr = dd.DimRedManager(recipe(method), model, total_steps=4).prepare(probe=probe_data("fp32"))
        mgr.check_agreement()
        out[method] = _ranged(mgr)
    return out
