"""Grouped DeepSpeed runs for the ZeRO tests (worker side).

A DeepSpeed launch costs seconds (most of it the first ``deepspeed.initialize`` of a process), a
further engine in the same process a fraction of a second. So one launch per (stage, precision)
builds one engine per scenario and records what the tests check; one more launch covers the
set-up checks of every stage. Workers record local data and gather it to rank 0; every comparison
with a single-process reference happens in the test process.
"""

from __future__ import annotations

from typing import Any

import torch

import dimred_dist
from dimred_dist.core.config import Recipe
from tests.zero_utils import (
    PRECISIONS,
    STAGES,
    Net,
    WideNet,
    build_engine,
    ds_config,
    flat_partitions,
    full_module_params,
    init_deepspeed,
    launch_once,
    local_masks,
    make_model,
    persistent_copies,
    real_entries,
    run_scenarios,
    train,
)

#: (stage, precision) of the grouped launches: every stage in fp32 and bf16, plus bf16 weights with
#: fp32 gradient accumulation where the adapter reads gradients from another buffer (ZeRO-2/3; on
#: ZeRO-1 that set-up is DeepSpeed's BF16_Optimizer, which the adapter rejects).
CASES = [(s, p) for s in STAGES for p in PRECISIONS] + [(2, "bf16acc32"), (3, "bf16acc32")]
CASE_IDS = [f"zero{s}-{p}" for s, p in CASES]

T_DYN, GA_DYN = 10, 2  # RigL / SET: updates before steps 2, 4 and 6 (end = 0.8 * 10)
T_FREEZE = 6
T_ADAMW = 5
T_BYTES = 5


# ---- recipes (shared with the single-process references) -----------------------------------
def dynamic_recipe(method: str) -> Recipe:
    """RigL: ERK at 80% (the 1-element layer and the biases stay dense). SET: uniform at 60%, so the
    small ZeRO-3-persistent parameters (``tiny.weight``, ``l2.bias``) are pruned and rewired too.
    GraNet: sparse-to-sparse from a random 50% to 70% along the cubic schedule (global magnitude
    pruning and per-layer regrowth before steps 2, 4 and 6)."""
    if method == "granet":
        return dimred_dist.load_recipe({"allow_empty_layers": True,
            "method": "granet", "sparsity": 0.7, "distribution": "global", "seed": 3, "targets": {"biases": True},
            "schedule": {"kind": "cubic", "interval": 2, "end_fraction": 0.6, "initial_sparsity": 0.5},
            "args": {"regrow_end_fraction": 0.6},
        })
    if method in ("snfs", "mest"):
        # uniform at 60% with a random start; SNFS moves budgets between layers by mean |momentum|; MEST
        # mutates int(r * numel) per layer, r = 0.2 before steps 2 and 4, 0.1 before step 6
        args = ({"momentum": 0.9} if method == "snfs" else
                {"init": "random", "mutation_ratios": [0.2, 0.1], "decay_fractions": [0.5]})
        return dimred_dist.load_recipe({"allow_empty_layers": True,
            "method": method, "sparsity": 0.6, "distribution": "uniform", "seed": 3, "targets": {"biases": True},
            "schedule": {"kind": "periodic", "interval": 2, "drop_fraction": 0.5, "end_fraction": 0.8,
                         "decay": "cosine", "skip_step": False},
            "args": args,
        })
    rigl = method == "rigl"
    return dimred_dist.load_recipe({"allow_empty_layers": True,
        "method": method, "sparsity": 0.8 if rigl else 0.6, "distribution": "erk" if rigl else "uniform", "seed": 3,
        "targets": {"biases": True},  # every parameter managed: the managed gradient is the whole gradient
        # legacy schedule values in args (they move into a periodic schedule); at end 8 the cosine-decayed
        # fraction of step 6 still drops entries after truncation
        "args": {"update_interval": 2, "drop_fraction": 0.5, "end_fraction": 0.8,
                 "decay": "cosine" if rigl else "constant"},
    })


def topkast_recipe() -> Recipe:
    """Top-KAST, forward density 0.4 and backward density 0.7 per layer, sets recomputed before steps
    2, 4, 6 and 8, a penalty large enough to move the gradients visibly."""
    return dimred_dist.load_recipe({"allow_empty_layers": True,
        "method": "topkast", "sparsity": 0.6, "distribution": "uniform", "seed": 3, "targets": {"biases": True},
        "args": {"backward_sparsity": 0.3, "interval": 2, "penalty": 0.05},
    })


def edge_popup_recipe() -> Recipe:
    """Edge-popup on the weights (biases train), half of each layer, the reference's score optimizer at a
    larger learning rate so the top-k moves within 10 steps."""
    return dimred_dist.load_recipe({"allow_empty_layers": True,
        "method": "edge_popup", "sparsity": 0.5, "distribution": "uniform", "seed": 3,
        "args": {"score_lr": 2.0, "momentum": 0.9, "weight_decay": 5e-4},
    })


def freeze_recipe() -> Recipe:
    return dimred_dist.load_recipe({"allow_empty_layers": True,
        "method": "random_freeze", "sparsity": 0.7, "distribution": "uniform", "seed": 5, "targets": {"biases": True},
    })


def magnitude_recipe() -> Recipe:
    return dimred_dist.load_recipe({"allow_empty_layers": True,
        "method": "magnitude", "sparsity": 0.7, "distribution": "erk", "seed": 0})


def bytes_recipe() -> Recipe:
    return dimred_dist.load_recipe({"allow_empty_layers": True,
        "method": "rigl", "sparsity": 0.9, "distribution": "uniform", "seed": 1, "args": {"update_interval": 2},
    })


def whole_freeze_recipe() -> Recipe:
    return dimred_dist.load_recipe({"allow_empty_layers": True,
        "method": "random", "sparsity": 0.5, "distribution": "uniform", "seed": 2, "freeze": [r"^l1\."],
    })


ADAMW_GROUPS = (
    {"lr": 2e-2, "weight_decay": 0.1},
    {"lr": 1e-2, "weight_decay": 0.0, "betas": (0.8, 0.99)},
)
ADAMW_EPS = 1e-6


# ---- helpers -----------------------------------------------------------------------------
def _layout(mgr) -> dict[str, Any]:
    views = mgr.views
    return {
        "ranges": {n: (v.start, v.end) for n, v in views.items()},
        "numels": {n: v.numel for n, v in views.items()},
        "shapes": {n: v.shape for n, v in views.items()},
        "local_numel": {n: v.local_numel for n, v in views.items()},
    }


def _master(mgr) -> dict[str, torch.Tensor]:
    return {n: v.weight().detach().clone() for n, v in mgr.views.items()}


def capture_client_steps(mgr, engine, rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Record every client optimizer step: flat partition, gradient, master before / after, mask.

    Also puts the flat layout into ``rec``: partition sizes, real (non-padding) entries and, per
    view, (flat index, offset). The post-hook is registered after the manager's, so ``after`` is
    the master as ZeRO copies it into the module weights.
    """
    inner, flats = mgr.optimizer, flat_partitions(engine)
    rec["inner_is_client"] = inner is engine.optimizer.optimizer
    rec["flat_numels"] = [f.numel() for f in flats]
    rec["real"] = real_entries(engine)
    rec["flat_of"] = {
        n: (next((i for i, f in enumerate(flats) if f is v.flat), None), v.offset) for n, v in mgr.views.items()
    }
    calls: list[dict[str, Any]] = []

    def stepped(o):
        for g in o.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    yield g, p, next(i for i, f in enumerate(flats) if f is p)

    def pre(o, args, kwargs):
        for g, p, i in stepped(o):
            calls.append({
                "step": mgr.step, "flat": i, "grad": p.grad.detach().reshape(-1).clone(),
                "before": p.detach().reshape(-1).clone(), "mask": o.train_mask(p),
                "hyper": {k: g[k] for k in ("lr", "betas", "eps", "weight_decay")},
            })

    def post(o, args, kwargs):
        for _, p, i in stepped(o):
            call = next(c for c in reversed(calls) if c["flat"] == i and c["step"] == mgr.step)
            call["after"] = p.detach().reshape(-1).clone()

    inner.register_step_pre_hook(pre)
    inner.register_step_post_hook(post)
    return calls


def _attach(recipe: Recipe, engine, total_steps: int):
    from dimred_dist.integrations.deepspeed import attach_to_engine

    return attach_to_engine(recipe, engine, total_steps=total_steps)


# ---- scenarios ---------------------------------------------------------------------------
def dynamic(stage: int, precision: str, method: str) -> dict[str, Any]:
    """RigL / SET: every topology update's inputs and outputs, gradient norms, final weights."""
    model = make_model(Net)
    engine = build_engine(model, ds_config(stage, precision, grad_acc=GA_DYN))
    mgr = _attach(dynamic_recipe(method), engine, T_DYN)
    rec = _layout(mgr)
    rec["managed_all"] = sorted(mgr.views) == sorted(n for n, _ in engine.module.named_parameters())
    rec["init"] = local_masks(mgr)
    rec["module_init"] = full_module_params(engine)
    rec["updates"], rec["sumsq"], rec["norms"] = [], [], []
    rec["calls"] = capture_client_steps(mgr, engine, rec)

    orig_update = mgr.method.update

    def update(ctx, step):
        before = {
            n: {"w": v.weight().detach().clone(), "g": v.grad().detach().clone(),
                "keep": ctx.state[n].keep.clone(), "train": ctx.state[n].train.clone(),
                **({"m": mgr.method.m[n].clone()} if hasattr(mgr.method, "m") else {})}
            for n, v in ctx.views.items()
        }
        metrics = orig_update(ctx, step)
        if metrics is None:  # no topology change at this step
            return None
        after = {
            n: {"w": v.weight().detach().clone(), "keep": ctx.state[n].keep.clone(),
                "train": ctx.state[n].train.clone(), "regrown": ctx.moment_resets[n].clone()}
            for n, v in ctx.views.items()
        }
        rec["updates"].append({"step": step, "before": before, "after": after, "metrics": dict(metrics)})
        return metrics

    mgr.method.update = update
    rec["observed"] = []
    orig_observe = mgr.method.observe

    def observe(ctx, step):  # every step's gradient slices (SNFS averages them)
        rec["observed"].append({n: v.grad().detach().float().clone() for n, v in ctx.views.items()})
        orig_observe(ctx, step)

    mgr.method.observe = observe
    orig_mask = mgr.mask_gradients

    def sumsq() -> float:
        return sum(float(v.grad().double().pow(2).sum()) for v in mgr.views.values())

    def mask_gradients():
        raw = sumsq()
        orig_mask()
        leaked = sum(int((v.grad()[~mgr.state[n].train] != 0).sum()) for n, v in mgr.views.items())
        rec["sumsq"].append({"step": mgr.step, "raw": raw, "masked": sumsq(), "leaked": leaked})

    mgr.mask_gradients = mask_gradients
    train(engine, model, T_DYN, precision, grad_acc=GA_DYN,
          after_step=lambda t: rec["norms"].append(float(engine.get_global_grad_norm())))
    rec["step"] = mgr.step
    rec["final"] = local_masks(mgr)
    rec["master"] = _master(mgr)
    rec["module"] = full_module_params(engine)
    rec["persistent"] = persistent_copies(engine)
    return rec


def topkast(stage: int, precision: str) -> dict[str, Any]:
    """Top-KAST: the sets, store and weights before and after every update, the gradient before and
    after the penalty, and the module weights after every step."""
    model = make_model(Net)
    engine = build_engine(model, ds_config(stage, precision, grad_acc=GA_DYN))
    mgr = _attach(topkast_recipe(), engine, T_DYN)
    m = mgr.method
    rec = _layout(mgr)

    def snap(ctx) -> dict[str, Any]:
        return {n: {"keep": ctx.state[n].keep.clone(), "fwd": m.forward[n].clone(), "theta": m.theta[n].clone(),
                    "w": v.weight().detach().clone()} for n, v in ctx.views.items()}

    rec["init"], rec["module_init"] = snap(mgr.ctx), full_module_params(engine)
    rec["steps"], rec["modules"] = [], []
    orig_update = m.update

    def update(ctx, step):
        before = snap(ctx)
        g_raw = {n: v.grad().detach().float().clone() for n, v in ctx.views.items()}
        metrics = orig_update(ctx, step)
        entry = {"step": step, "before": before, "g_raw": g_raw, "after": snap(ctx), "changed": metrics is not None,
                 "g": {n: v.grad().detach().float().clone() for n, v in ctx.views.items()},
                 "regrown": {n: ctx.moment_resets[n].clone() for n in ctx.views} if metrics is not None else {}}
        rec["steps"].append(entry)
        return metrics

    m.update = update
    train(engine, model, T_DYN, precision, grad_acc=GA_DYN,
          after_step=lambda t: rec["modules"].append((snap(mgr.ctx), full_module_params(engine))))
    rec["step"] = mgr.step
    return rec


def edge_popup(stage: int, precision: str) -> dict[str, Any]:
    """Edge-popup: every step's gradient, scores and momentum before and after the score step, the top-k
    and the weights after it, and the module weights after training."""
    model = make_model(Net)
    engine = build_engine(model, ds_config(stage, precision, grad_acc=GA_DYN))
    mgr = _attach(edge_popup_recipe(), engine, T_DYN)
    m = mgr.method
    rec = _layout(mgr)
    rec["init"] = {n: {"scores": m.scores[n].clone(), "w0": m.w0[n].clone(), "keep": mgr.state[n].keep.clone(),
                       "w": v.weight().detach().clone()} for n, v in mgr.views.items()}
    rec["steps"] = []
    orig_observe, orig_update = m.observe, m.update

    def observe(ctx, step):
        entry = {n: {"g": v.grad().detach().float().clone(), "s0": m.scores[n].clone(), "buf0": m.buf[n].clone()}
                 for n, v in ctx.views.items()}
        orig_observe(ctx, step)
        for n in entry:
            entry[n].update({"s": m.scores[n].clone(), "buf": m.buf[n].clone()})
        rec["steps"].append({"step": step, "lr": m.score_lr(step, ctx.total_steps), "views": entry})

    def update(ctx, step):
        out = orig_update(ctx, step)
        for n, v in ctx.views.items():
            rec["steps"][-1]["views"][n].update({"keep": ctx.state[n].keep.clone(), "train": ctx.state[n].train.clone(),
                                                 "w": v.weight().detach().clone()})
        rec["steps"][-1]["changed"] = out is not None
        return out

    m.observe, m.update = observe, update
    train(engine, model, T_DYN, precision, grad_acc=GA_DYN)
    rec["final"] = local_masks(mgr)
    rec["module"] = full_module_params(engine)
    rec["step"] = mgr.step
    return rec


def freeze(stage: int, precision: str) -> dict[str, Any]:
    """Element-wise random freezing: masks, masters and module weights before and after training."""
    model = make_model(Net)
    engine = build_engine(model, ds_config(stage, precision))
    mgr = _attach(freeze_recipe(), engine, T_FREEZE)
    rec = _layout(mgr)
    rec["masks0"] = local_masks(mgr)
    rec["master0"] = _master(mgr)
    rec["module0"] = full_module_params(engine)
    train(engine, model, T_FREEZE, precision)
    rec["masks"] = local_masks(mgr)
    rec["master"] = _master(mgr)
    rec["module"] = full_module_params(engine)
    rec["persistent"] = persistent_copies(engine)
    rec["step"] = mgr.step
    return rec


def adamw(stage: int, precision: str) -> dict[str, Any]:
    """Static magnitude pruning, two param groups: what the client optimizer receives and produces."""
    from dimred_dist.optim import CompactAdamW

    model = make_model(Net)
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n.endswith("weight")], **ADAMW_GROUPS[0]},
        {"params": [p for n, p in named if n.endswith("bias")], **ADAMW_GROUPS[1]},
    ]
    engine = build_engine(model, ds_config(stage, precision), CompactAdamW(groups, eps=ADAMW_EPS))
    mgr = _attach(magnitude_recipe(), engine, T_ADAMW)
    rec = _layout(mgr)
    rec["masks"] = local_masks(mgr)
    rec["master0"] = _master(mgr)
    calls = capture_client_steps(mgr, engine, rec)
    train(engine, model, T_ADAMW, precision)
    rec["calls"] = calls
    rec["step"] = mgr.step
    return rec


def state_bytes(stage: int, precision: str) -> dict[str, Any]:
    """RigL at 10% density on a model of ~52k entries: compact optimizer state per rank."""
    model = make_model(WideNet)
    engine = build_engine(model, ds_config(stage, precision))
    mgr = _attach(bytes_recipe(), engine, T_BYTES)
    train(engine, model, T_BYTES, precision)
    inner, flats = mgr.optimizer, flat_partitions(engine)
    n_train, moments_match = 0, True
    for f in flats:
        m = inner.train_mask(f)
        n = f.numel() if m is None else int(m.sum())
        n_train += n
        st = inner.state[f]
        moments_match &= all(st[k].numel() == n for k in ("exp_avg", "exp_avg_sq"))
    metrics = mgr.metrics()
    return {
        "state_bytes": inner.state_bytes(), "flat_numel": sum(f.numel() for f in flats), "n_train": n_train,
        "moments_match": moments_match, "churn": metrics.get("dimred/churn", 0.0),
        "density": metrics["dimred/density"], "step": mgr.step,
    }


def suite_worker(rank: int, world_size: int, stage: int, precision: str):
    init_deepspeed()
    return run_scenarios({
        "rigl": lambda: dynamic(stage, precision, "rigl"),
        "set": lambda: dynamic(stage, precision, "set"),
        "granet": lambda: dynamic(stage, precision, "granet"),
        "snfs": lambda: dynamic(stage, precision, "snfs"),
        "mest": lambda: dynamic(stage, precision, "mest"),
        "topkast": lambda: topkast(stage, precision),
        "edge_popup": lambda: edge_popup(stage, precision),
        "freeze": lambda: freeze(stage, precision),
        "adamw": lambda: adamw(stage, precision),
        "bytes": lambda: state_bytes(stage, precision),
    })


def suite(stage: int, precision: str) -> dict[str, Any]:
    """The grouped launch of (stage, precision), run once per session."""
    return launch_once(("suite", stage, precision), suite_worker, stage, precision)


# ---- set-up checks -----------------------------------------------------------------------
def attach_error(config: dict[str, Any], optimizer_cls=None, *, attach_first: bool = False) -> dict[str, Any]:
    """Build an engine and try to attach; record the error, whether anything was hooked and whether
    the weights changed. ``attach_first``: attach once successfully, then try a second manager."""
    model = make_model(Net)
    opt = None if optimizer_cls is None else optimizer_cls(model.parameters(), lr=1e-2)
    engine = build_engine(model, config, opt)
    z = engine.optimizer
    if attach_first:
        _attach(magnitude_recipe(), engine, 4)
    rec: dict[str, Any] = {"zero": type(z).__name__, "error": None}
    step_before = z.step
    w0 = full_module_params(engine)
    try:
        _attach(dimred_dist.load_recipe({"allow_empty_layers": True,
            "method": "random", "sparsity": 0.5, "seed": 7}), engine, 4)
    except Exception as e:  # noqa: BLE001  (the test judges the type and message)
        rec["error"] = (type(e).__name__, str(e))
    w1 = full_module_params(engine)
    rec["changed_weights"] = sorted(n for n in w0 if not torch.equal(w0[n], w1[n]))
    if attach_first:
        rec["step_wrapped"] = z.step != step_before
    else:
        rec["step_wrapped"] = "step" in vars(z) or bool(getattr(z, "_dimred_installed", False))
    rec["global_steps"] = engine.global_steps
    return rec


def whole_freeze(stage: int, precision: str) -> dict[str, Any]:
    """The same model with and without whole-tensor freezing of ``l1``: what ZeRO allocates."""
    from dimred_dist.core.targets import freeze_whole_tensors

    recipe = whole_freeze_recipe()
    out: dict[str, Any] = {}
    for frozen in (False, True):
        model = make_model(Net)
        names = freeze_whole_tensors(model, recipe.freeze) if frozen else []
        engine = build_engine(model, ds_config(stage, precision))
        mgr = _attach(recipe, engine, 3)
        z = engine.optimizer
        groups = z.fp16_groups if stage == 3 else z.bit16_groups
        w0 = full_module_params(engine)
        train(engine, model, 3, precision)
        w1 = full_module_params(engine)
        counts = mgr.global_counts()
        out["frozen" if frozen else "dense"] = {
            "frozen_names": names,
            "managed": sorted(mgr.views),
            "flat_numel": sum(f.numel() for f in flat_partitions(engine)),
            "state_bytes": mgr.optimizer.state_bytes(),
            "train_counts": {n: int(c[0]) for n, c in counts.items()},
            "in_optimizer": {n: any(p is q for g in groups for q in g) for n, p in engine.module.named_parameters()},
            "hp_mapping": {n: getattr(p, "_hp_mapping", None) is not None for n, p in engine.module.named_parameters()},
            "unchanged": {n: torch.equal(w0[n], w1[n]) for n in w0},
            "numels": {n: p.ds_numel if stage == 3 else p.numel() for n, p in engine.module.named_parameters()},
            "step": mgr.step,
        }
    return out


def setup_worker(rank: int, world_size: int):
    init_deepspeed()
    cases: dict[str, Any] = {
        "bf16_optimizer": lambda: attach_error(ds_config(1, "bf16acc32")),
        "round_robin_1": lambda: attach_error(ds_config(1, round_robin_gradients=True)),
        "round_robin_2": lambda: attach_error(ds_config(2, round_robin_gradients=True)),
        "second_manager": lambda: attach_error(ds_config(2), attach_first=True),
    }
    for s in STAGES:
        cases[f"offload_{s}"] = lambda s=s: attach_error(
            {**ds_config(s, offload_optimizer={"device": "cpu"}), "zero_force_ds_cpu_optimizer": False})
        cases[f"non_compact_{s}"] = lambda s=s: attach_error(ds_config(s), torch.optim.AdamW)
        for p in PRECISIONS:
            cases[f"whole_freeze_{s}_{p}"] = lambda s=s, p=p: whole_freeze(s, p)
    return run_scenarios(cases)


def setup() -> dict[str, Any]:
    return launch_once(("setup",), setup_worker)
