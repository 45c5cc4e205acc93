"""Dynamic sparse fine-tuning: SpIEL (Ansell et al., 2024, "Scaling Sparse Fine-Tuning to Large
Language Models"), the accumulated-gradient variant SpIEL-AG, following its reference code
(AlanAnsell/peft, ``tuners/sft``).

A fraction ``1 - sparsity`` of each managed tensor's entries TRAINs (``distribution: uniform``: the
budget split in proportion to the tensors' sizes, as the reference code does); every other entry
FREEZEs at its pretrained value. The initial set is uniformly random. On a ``periodic`` schedule
(the reference: every 20 steps, offset 5, ``drop_fraction`` 0.2 decayed linearly to 0 at the end of
training, 1.0 at the first update):

* **accumulate**: over the ``accumulation_steps`` steps up to and including an update step (5), the
  dense reduced gradient of this rank is summed at *candidates*: the entries with the largest |g| of
  the window's first step, as many per tensor as it trains (the reference code's memory bound:
  4 + 8 bytes per candidate, nothing per frozen entry);
* **drop**: per tensor ``int(p * n_train)`` TRAIN entries that moved least, smallest ``|w - w0|``;
  they return to their pretrained value ``w0`` and FREEZE;
* **grow**: as many candidates that do not train, largest ``|sum g|``; they start at their
  pretrained value (which a frozen entry holds) with zero optimizer moments. An entry dropped and
  regrown in one update keeps its value and moments, as in the reference code.

The pretrained values of the TRAIN entries are kept compactly, 4 bytes per TRAIN entry of the rank
(a frozen entry holds its own); an update and a checkpoint save build them over the whole local range
for a moment (4 bytes per entry, freed afterwards), as the drop and grow scores do. A step whose
gradients are not finite on some rank (an fp16 overflow, which DeepSpeed skips) adds nothing to the
sums. With fp16 loss scaling the sums add scaled gradients (the scale may change inside a window).

Where this differs from the reference code: the reference seeds the moments of grown entries from
the accumulated statistics with per-entry bias correction (its own ``SftAdamW``); here they start at
zero (any optimizer works), and weight decay, if any, decays towards 0 rather than towards the
pretrained value (the shipped recipe trains without it). The optimizer steps on update steps
(``skip_step: false``), as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dimred_dist.core.config import MethodConfig
from dimred_dist.core.registry import register_method
from dimred_dist.core.state import ElementState
from dimred_dist.distributed.views import ShardView
from dimred_dist.methods.base import Method, MethodContext
from dimred_dist.methods.static import random_scores


@dataclass(kw_only=True)
class SpIELConfig(MethodConfig):
    """Attributes:
        accumulation_steps: Steps whose gradients score the growth of an update, the update step
            included (``selection_accumulation_steps`` in the reference code, 5).
    """

    accumulation_steps: int = 5

    def __post_init__(self) -> None:
        a = self.accumulation_steps
        if isinstance(a, bool) or not isinstance(a, int) or a < 1:
            raise ValueError(f"accumulation_steps must be an integer >= 1, got {a!r}")


@register_method("spiel")
class SpIEL(Method):
    needs_pretrained = True
    config_cls = SpIELConfig
    init_state = ElementState.FREEZE
    default_schedule: ClassVar[dict[str, Any]] = {
        "kind": "periodic", "interval": 20, "offset": 5, "drop_fraction": 0.2, "decay": "linear",
        "end_fraction": 1.0, "first_drop_fraction": 1.0, "skip_step": False,
    }

    def setup(self, ctx: MethodContext) -> None:
        super().setup(ctx)
        if not self.schedule.regrows:
            raise ValueError(f"spiel swaps entries on a periodic schedule, not on a {self.schedule.kind!r} one")
        a, first = self.config.accumulation_steps, self.schedule.first_update(ctx.total_steps)
        if a > self.schedule.interval or (first is not None and a > first):
            raise ValueError(
                f"spiel: accumulation_steps {a} is longer than the schedule's interval {self.schedule.interval} or "
                f"than the steps before its first update ({first}); the windows would be cut short"
            )
        self.w0: dict[str, torch.Tensor] = {}  # pretrained values of the TRAIN entries, in index order
        self.cand: dict[str, torch.Tensor] = {}  # local indices of the growth candidates
        self.acc: dict[str, torch.Tensor] = {}  # their summed gradients
        self._w0_full: dict[str, torch.Tensor] | None = None
        self._ctx = ctx  # for the checkpoint's full-range tensors

    def init_scores(self, view: ShardView, ctx: MethodContext) -> torch.Tensor:
        return random_scores(self.recipe.seed, view)

    def initialize(self, ctx: MethodContext) -> None:
        super().initialize(ctx)
        self.w0 = {n: v.weight().detach()[ctx.state[n].train].float().clone() for n, v in ctx.views.items()}

    # ---- accumulation --------------------------------------------------------------------
    def _next_update(self, step: int, total: int) -> int | None:
        for t in range(step, min(step + self.config.accumulation_steps, total)):
            if self.schedule.is_update_step(t, total):
                return t
        return None

    @torch.no_grad()
    def observe(self, ctx: MethodContext, step: int) -> None:
        if self.recipe.sparsity == 0.0 or self._next_update(step, ctx.total_steps) is None:
            return
        if not ctx.grads_finite(step, "spiel"):
            return  # an overflow step (fp16 loss scaling): DeepSpeed skips it, and so does the sum
        if not self.cand:  # the window's first step: fix the candidates
            mags = {n: v.grad().detach().abs() for n, v in ctx.views.items()}
            counts = ctx.global_count({n: ctx.state[n].train for n in ctx.views})
            picked = ctx.select(mags, counts)
            self.cand = {n: m.nonzero().squeeze(1) for n, m in picked.items()}
            self.acc = {n: torch.zeros(len(i), dtype=torch.float32, device=i.device) for n, i in self.cand.items()}
        for n, v in ctx.views.items():
            self.acc[n] += v.grad().detach()[self.cand[n]].float()

    # ---- the update ----------------------------------------------------------------------
    def scores(self, view: ShardView, ctx: MethodContext) -> torch.Tensor:
        return (view.weight().detach().float() - self._w0_full[view.name]).abs()

    def _at_candidates(self, view: ShardView, values: torch.Tensor) -> torch.Tensor:
        """``values`` (one per candidate) over the view's local range, zero (False) elsewhere."""
        out = torch.zeros(view.local_numel, dtype=values.dtype, device=values.device)
        out[self.cand[view.name]] = values
        return out

    def grow_candidates(self, view: ShardView, ctx: MethodContext, step: int) -> torch.Tensor:
        idx = self.cand[view.name]
        return self._at_candidates(view, torch.ones(len(idx), dtype=torch.bool, device=idx.device))

    def grow_scores(self, view: ShardView, ctx: MethodContext, step: int) -> torch.Tensor:
        return self._at_candidates(view, self.acc[view.name].abs())

    @torch.no_grad()
    def rewire(self, ctx: MethodContext, step: int) -> dict[str, float] | None:
        if not self.cand:
            raise RuntimeError(f"spiel: no accumulated gradients at its update step {step}")
        old = ctx.active_masks(self.init_state)
        self._w0_full = {n: self._pretrained(n, v, old[n]) for n, v in ctx.views.items()}
        try:
            out = super().rewire(ctx, step)
            for n, v in ctx.views.items():
                train, w0 = ctx.state[n].train, self._w0_full[n]
                dropped = old[n] & ~train
                w = v.weight()
                w[dropped] = w0[dropped].to(w.dtype)
                self.w0[n] = w0[train].clone()
        finally:
            self._w0_full, self.cand, self.acc = None, {}, {}
        return out

    def _pretrained(self, name: str, view: ShardView, train: torch.Tensor) -> torch.Tensor:
        """The pretrained value of every local entry (a frozen entry holds its own)."""
        full = view.weight().detach().float().clone()
        full[train] = self.w0[name].to(full.device)
        return full

    # ---- persistence ---------------------------------------------------------------------
    def tensor_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Over each view's local range: ``w0`` (every entry's pretrained value) and, inside an
        accumulation window, ``candidate`` (bool) and ``grad_sum``; they reshard like the masks."""
        ctx = self._ctx
        out = {"w0": {n: self._pretrained(n, v, ctx.state[n].train) for n, v in ctx.views.items()}}
        if self.cand:
            out["candidate"] = {n: self.grow_candidates(v, ctx, -1) for n, v in ctx.views.items()}
            out["grad_sum"] = {n: self._at_candidates(v, self.acc[n]) for n, v in ctx.views.items()}
        return out

    def load_tensor_state(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        extra = sorted(set(tensors) - {"w0", "candidate", "grad_sum"})
        if extra or "w0" not in tensors:
            raise ValueError(f"spiel: the checkpoint's method tensors are {sorted(tensors)}, expected w0 "
                             "(and candidate, grad_sum)")
        state = self._ctx.state
        self.w0 = {n: t.float()[state[n].train.to(t.device)].clone() for n, t in tensors["w0"].items()}
        self.cand = {n: m.bool().nonzero().squeeze(1) for n, m in tensors.get("candidate", {}).items()}
        self.acc = {n: tensors["grad_sum"][n].float()[i].clone() for n, i in self.cand.items()}
