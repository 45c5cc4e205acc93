"""Pruning at initialization: score every entry before training, keep the best ones.

* ``snip``: Lee et al., 2019, "SNIP: Single-shot Network Pruning based on Connection Sensitivity":
  ``|w * g|`` with ``g`` the gradient of the loss summed over ``batches`` probe batches (the sum is
  taken before the absolute value, as in Synaptic-Flow's implementation).
* ``grasp``: Wang et al., 2020, "Picking Winning Tickets Before Training by Preserving Gradient
  Flow": the paper removes the entries with the largest ``-w * (H g)``; the kept score here is
  ``w * (H g)`` (the same order), with ``g`` and ``H`` of the loss of ``logits / temperature``
  (T = 200 as in the official code), summed over the probe batches. ``H g`` comes from double
  backward where the adapter can differentiate twice (one process, DDP), else from central finite
  differences of two gradient evaluations (DeepSpeed ZeRO; see :meth:`Prober.hessian_gradient`).
* ``synflow``: Tanaka et al., 2020, "Pruning neural networks without any data by iteratively
  conserving synaptic flow": data-free, ``rounds`` rounds (100) at densities ``d ** (k / rounds)``,
  each scoring ``|w * dR/dw|`` with ``R`` the summed output of the network whose every floating
  tensor (weights, biases, norms, buffers) is replaced by its absolute value and whose pruned entries
  are 0, on an all-ones input (token models: an all-ones ``inputs_embeds``). Pruned entries cannot
  come back. In one process / DDP the passes run in float64 (no overflow on deep networks); under
  ZeRO they run in the weights' dtype and a non-finite ``R`` raises. Ranking uses ``log(score)``,
  so float64 scores far outside float32's range still order correctly.
* ``iter_snip`` and ``force``: de Jorge et al., 2021, "Progressive Skeletonization: Trimming more
  fat from a network at initialization": ``rounds`` rounds at densities ``d ** (k / rounds)``; each
  round scores ``|w0 * g|`` with ``g`` the gradient (averaged over ``batches`` batches) of the
  network whose pruned entries are 0 and ``w0`` the initial weights. Iterative SNIP keeps pruned
  entries pruned; FORCE lets every entry compete again each round (pruned weights come back with
  their initial value), as in the official code.

All of them score in eval mode (dropout off, normalization with running statistics), as
Synaptic-Flow's pruning loop does; the weights are bit-identical afterwards except for the pruning.
Layer budgets follow the recipe's ``distribution``; the papers use one global budget
(``distribution: global``), which the shipped recipes set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dimred_dist.core.config import MethodConfig
from dimred_dist.core.registry import register_method
from dimred_dist.distributed.views import ShardView
from dimred_dist.methods.base import Method, MethodContext


def _check_positive_int(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{label} must be an integer >= 1, got {value!r}")


@dataclass(kw_only=True)
class ProbeConfig(MethodConfig):
    """Attributes:
        batches: Probe batches the scores are computed on (drawn from the train set, the same on every rank).
    """

    batches: int = 1

    def __post_init__(self) -> None:
        _check_positive_int("batches", self.batches)


@dataclass(kw_only=True)
class GraSPConfig(ProbeConfig):
    """Attributes:
        temperature: The logits are divided by it before the loss (200 in the official code).
        hvp: ``auto``, ``double_backward`` or ``finite_difference``: how ``H g`` is computed.
    """

    temperature: float = 200.0
    hvp: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        if self.hvp not in ("auto", "double_backward", "finite_difference"):
            raise ValueError(f"hvp must be 'auto', 'double_backward' or 'finite_difference', got {self.hvp!r}")


@dataclass(kw_only=True)
class IterativeConfig(ProbeConfig):
    """Attributes:
        rounds: Pruning rounds; round k (1-based) keeps density ``d ** (k / rounds)``.
    """

    rounds: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("rounds", self.rounds)


@dataclass(kw_only=True)
class SynFlowConfig(MethodConfig):
    """Attributes:
        rounds: Pruning rounds (100 in the paper), round k at density ``d ** (k / rounds)``.
        precision: ``auto`` (float64 where the adapter allows it: one process / DDP), ``float64`` (raise
            elsewhere) or ``model`` (the weights' dtype).
    """

    rounds: int = 100
    precision: str = "auto"

    def __post_init__(self) -> None:
        _check_positive_int("rounds", self.rounds)
        if self.precision not in ("auto", "float64", "model"):
            raise ValueError(f"precision must be 'auto', 'float64' or 'model', got {self.precision!r}")


class _Probed(Method):
    """A method whose initial topology comes from :meth:`probe`: ``self.probe_scores`` per view, which
    select it; ``self.round_scores``, for inspection, are the scores of the last round (iterative methods)."""

    probe_scores: dict[str, torch.Tensor]
    round_scores: dict[str, torch.Tensor] | None = None

    def init_scores(self, view: ShardView, ctx: MethodContext) -> torch.Tensor:
        scores = getattr(self, "probe_scores", None)
        if scores is None:
            raise RuntimeError(f"{self.method_name}: probe() has not run; give the manager probe data")
        return scores[view.name]

    def initialize(self, ctx: MethodContext) -> None:
        super().initialize(ctx)
        self.probe_scores = None  # one selection: free the scores

    def scores(self, view: ShardView, ctx: MethodContext) -> torch.Tensor:
        """During training, with a schedule that prunes later (``cubic``, ``imp``, ...): ``|w * g|`` with the
        step's gradient, SNIP's criterion, for every method of this family (a new probe per update would
        need probe data inside the training step)."""
        g = view.grad()
        if g is None:
            raise RuntimeError(f"{self.method_name} needs the gradient of {view.name} to score it")
        return (view.weight().detach() * g.detach()).abs()


@register_method("snip")
class SNIP(_Probed):
    config_cls = ProbeConfig
    needs_data: ClassVar[bool] = True

    def probe(self, ctx: MethodContext, prober) -> None:
        names = list(ctx.views)
        g = prober.gradients(names, prober.batches(self.config.batches, "snip"), progress="snip")
        prober.check_nonzero(g, "snip")
        self.probe_scores = {n: (ctx.views[n].weight().detach().float() * g[n]).abs() for n in names}


@register_method("grasp")
class GraSP(_Probed):
    config_cls = GraSPConfig
    needs_data: ClassVar[bool] = True

    def probe(self, ctx: MethodContext, prober) -> None:
        cfg, names = self.config, list(ctx.views)
        batches = prober.batches(cfg.batches, "grasp")
        g = prober.gradients(names, batches, temperature=cfg.temperature, progress="grasp: g")
        prober.check_nonzero(g, "grasp")
        hg = prober.hessian_gradient(names, batches, g, temperature=cfg.temperature, mode=cfg.hvp)
        self.probe_scores = {n: ctx.views[n].weight().detach().float() * hg[n] for n in names}


@register_method("synflow")
class SynFlow(_Probed):
    config_cls = SynFlowConfig

    def probe(self, ctx: MethodContext, prober) -> None:
        cfg, names = self.config, list(ctx.views)
        double = cfg.precision == "float64" or (cfg.precision == "auto" and prober.supports_double_backward)
        if double and not prober.supports_double_backward:
            raise ValueError("synflow precision float64 needs one process or DDP; use precision: model under ZeRO")
        keep = {n: torch.ones(v.local_numel, dtype=torch.bool) for n, v in ctx.views.items()}
        args, kwargs = prober.synthetic_input("synflow")
        with _float64(prober.model, double), prober.preserved(others=True) as others:
            for t in others:
                t.abs_()
            if double:
                args = tuple(a.double() for a in args)
                kwargs = {k: v.double() for k, v in kwargs.items()}
            for k in prober.rounds(cfg.rounds, "synflow"):
                scores, self.round_scores = self._round(ctx, prober, names, keep, args, kwargs, double)
                density = self.recipe.density ** ((k + 1) / cfg.rounds)
                keep = ctx.select(scores, ctx.budgets(density), eligible=keep)
        self.probe_scores = {n: keep[n].float() for n in names}

    def _round(self, ctx, prober, names, keep, args, kwargs, double):
        """One SynFlow pass: |w| everywhere, pruned entries 0; returns (log |w * dR/dw|, |w * dR/dw|) per view."""
        prober.edit(lambda n, w: (w.abs() * keep[n]) if n in keep else w.abs())

        def flow(model, _):
            out = model(*args, **kwargs)
            out = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
            return out.double().sum()

        g = prober.gradients(names, [None], forward=flow, dtype=torch.float64)
        logs, raw = {}, {}
        for n in names:
            s = (ctx.views[n].weight().detach().double() * g[n].double()).abs()
            if not bool(torch.isfinite(s).all()):
                raise ValueError(f"synflow overflowed in {ctx.views[n].weight().dtype} on {n}; run it in one process "
                                 "or DDP (precision float64)")
            logs[n], raw[n] = s.log().float(), s  # the order of float64 scores, in float32 keys
        return logs, raw


class _Progressive(_Probed):
    """Iterative SNIP / FORCE (de Jorge et al., 2021); ``revive`` lets pruned entries compete again."""

    config_cls = IterativeConfig
    needs_data: ClassVar[bool] = True
    revive: ClassVar[bool] = False

    def probe(self, ctx: MethodContext, prober) -> None:
        cfg, names = self.config, list(ctx.views)
        batches = prober.batches(cfg.batches, self.method_name)
        keep = {n: torch.ones(v.local_numel, dtype=torch.bool) for n, v in ctx.views.items()}
        with prober.preserved():
            w0 = {n: prober.original(n).float() for n in names}
            for k in prober.rounds(cfg.rounds, self.method_name):
                prober.edit(lambda n, w: w * keep[n] if n in keep else w)
                g = prober.gradients(names, batches, mean=True)
                prober.check_nonzero(g, self.method_name)
                scores = self.round_scores = {n: (w0[n] * g[n]).abs() for n in names}
                density = self.recipe.density ** ((k + 1) / cfg.rounds)
                keep = ctx.select(scores, ctx.budgets(density), eligible=None if self.revive else keep)
        self.probe_scores = {n: keep[n].float() for n in names}


@register_method("iter_snip")
class IterativeSNIP(_Progressive):
    revive = False


@register_method("force")
class FORCE(_Progressive):
    revive = True


class _float64:
    """Context: the module in float64 (one process / DDP), restored to its dtypes exactly afterwards
    (float32 and bfloat16 values are exact in float64). Parameters keep their identity; buffers, which
    ``Module.double`` replaces, are put back by name."""

    def __init__(self, model, enabled: bool) -> None:
        self.model, self.enabled = model, enabled

    def __enter__(self):
        if self.enabled:
            self.params = {n: p.dtype for n, p in self.model.named_parameters()}
            self.buffers = {n: b.dtype for n, b in self.model.named_buffers()}
            self.model.double()
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        for n, p in self.model.named_parameters():
            p.data = p.data.to(self.params[n])
        for n, b in list(self.model.named_buffers()):
            owner, _, key = n.rpartition(".")
            module = self.model.get_submodule(owner) if owner else self.model
            module._buffers[key] = b.to(self.buffers[n])
        return False
