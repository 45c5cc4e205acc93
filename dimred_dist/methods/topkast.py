"""Top-KAST: Jayakumar, Pascanu, Rae, Osindero & Elsen, 2020, "Top-KAST: Top-K Always Sparse Training".

Every managed parameter keeps its full set of values θ, of which two nested sets are chosen by
magnitude: the *forward set* A, the top-D of |θ| (D = the recipe's density), which alone takes part
in the forward pass, and the *backward set* B ⊇ A, the top-(D + M) of |θ| (``backward_sparsity``
= 1 - (D + M)), which receives gradients and optimizer updates. Entries of B \\ A are updated with
the gradient of the loss at their (zero) forward value, so an entry that grows can enter A at the
next recomputation; entries outside B keep their value and are not updated.

* **Sets**: recomputed before step 0 and before every ``interval``-th step (the paper computes them
  per step and notes they change slowly; ``interval: 1`` is the per-step form), per layer with the
  recipe's distribution (the paper's uniform Top-K per layer), exactly and identically on every rank.
* **Exploration penalty**: ``penalty / 2 * θ_i**2`` on entries of A and ``penalty / (2 D) * θ_i**2`` on
  entries of B \\ A, added to the loss (its gradient ``penalty * θ_i`` resp. ``penalty * θ_i / D`` is
  added to the reduced gradient before the optimizer, its norm and its clipping see it): an entry
  outside A must overcome a stronger pull to zero to enter it, which keeps the sets from thrashing.
* **Storage in this project**: B is the set of non-PRUNE entries, so the optimizer (compact or not)
  keeps moments for B only; entries entering B start with zero moments, entries leaving B keep their
  value in the method's store. Between steps the weights of B \\ A are 0 in the master and in every
  module copy (the forward pass sees A only): before each optimizer step they are restored from the
  store, after it the store takes their new values and they are zeroed again. The manager's density
  and ITOP figures therefore count B; ``dimred/topkast/forward_density`` is A's.

Memory: the store is 4 bytes (fp32) for every managed entry a rank holds and the forward mask 1
byte (``dimred/topkast/state_bytes``, summed over ranks, ``.../state_bytes_max`` on the largest rank);
both are checkpointed by global range, so they reshard.

Where this differs from the paper: the paper writes the penalty with |θ_i| and calls it an L2
penalty; here it is the squared L2 form above (``penalty`` 1e-4 by default; the paper tunes it). With
fp16 loss scaling the penalty is added to the scaled gradient, so it is weaker by the loss scale:
use bf16 or fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dimred_dist.core.config import MethodConfig, Recipe
from dimred_dist.core.registry import register_method
from dimred_dist.core.state import ElementState
from dimred_dist.methods.base import Method, MethodContext

_PRUNE = ElementState.PRUNE


@dataclass(kw_only=True)
class TopKASTConfig(MethodConfig):
    """Attributes:
        backward_sparsity: Sparsity of the backward set B, at most the recipe's sparsity (None: 0.1
            below it, floored at 0, as the paper's pairs 90/80 and 80/70).
        interval: The sets are recomputed before every ``interval``-th step.
        penalty: Weight of the exploration penalty (0 turns it off).
    """

    backward_sparsity: float | None = None
    interval: int = 100
    penalty: float = 1e-4

    def __post_init__(self) -> None:
        b = self.backward_sparsity
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0):
            raise ValueError(f"backward_sparsity must be a fraction in [0, 1), got {b!r}")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {self.interval!r}")
        p = self.penalty
        if isinstance(p, bool) or not isinstance(p, (int, float)) or p < 0.0:
            raise ValueError(f"penalty must be a number >= 0, got {p!r}")


def backward_sparsity(recipe: Recipe) -> float:
    b = recipe.args.backward_sparsity
    return max(0.0, recipe.sparsity - 0.1) if b is None else float(b)


@register_method("topkast")
class TopKAST(Method):
    config_cls = TopKASTConfig

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        b = backward_sparsity(recipe)
        if b > recipe.sparsity:
            raise ValueError(
                f"topkast: backward_sparsity {b} is above the recipe's sparsity {recipe.sparsity}: the backward set "
                f"(density {1 - b:.4g}) would be smaller than the forward set (density {recipe.density:.4g})")

    @property
    def dynamic(self) -> bool:
        return self.recipe.sparsity > 0.0

    def setup(self, ctx: MethodContext) -> None:
        super().setup(ctx)
        self.require_no_schedule("topkast recomputes its sets every `args.interval` steps; give no `schedule`")
        self.theta = {n: torch.zeros(v.local_numel, dtype=torch.float32, device=v.weight().device)
                      for n, v in ctx.views.items()}
        self.forward = {n: torch.zeros(v.local_numel, dtype=torch.bool, device=v.weight().device)
                        for n, v in ctx.views.items()}
        self._bytes = ctx.state_bytes(5)
        self._forward_density = 1.0

    def _hidden(self, ctx: MethodContext, name: str) -> torch.Tensor:
        """Local mask of B \\ A: updated by the optimizer, 0 in the forward pass."""
        return ctx.state[name].keep & ~self.forward[name]

    @torch.no_grad()
    def initialize(self, ctx: MethodContext) -> None:
        if self.recipe.sparsity == 0.0:
            return
        for n, v in ctx.views.items():
            self.theta[n].copy_(v.weight().float())
        self._recompute(ctx)
        ctx.take_requests()  # no optimizer yet: nothing to reset
        self._hide(ctx, ctx.views)

    @torch.no_grad()
    def observe(self, ctx: MethodContext, step: int) -> None:
        """Before the optimizer step: B \\ A get their values back from the store."""
        if self.recipe.sparsity == 0.0:
            return
        for n, v in ctx.views.items():
            w = v.weight()
            torch.where(self._hidden(ctx, n), self.theta[n].to(w.dtype), w, out=w)

    @torch.no_grad()
    def update(self, ctx: MethodContext, step: int) -> dict[str, float] | None:
        """Before every ``interval``-th step: new sets; every step: the penalty's gradient."""
        if self.recipe.sparsity == 0.0:
            return None
        out = self._recompute(ctx) if step > 0 and step % self.config.interval == 0 else None
        self._penalize(ctx, step)
        return out

    def _recompute(self, ctx: MethodContext) -> dict[str, float]:
        """B = top-(D + M) and A = top-D of |θ| per layer; the master holds θ on B and 0 elsewhere."""
        old_b = ctx.active_masks(_PRUNE)
        theta = {n: torch.where(old_b[n], v.weight().float(), self.theta[n]) for n, v in ctx.views.items()}
        scores = {n: t.abs() for n, t in theta.items()}
        back = ctx.select(scores, ctx.budgets(1.0 - backward_sparsity(self.recipe)))
        n_back = ctx.global_count(back)
        fwd = ctx.select(scores, {n: min(c, n_back[n]) for n, c in ctx.budgets(self.recipe.density).items()},
                         eligible=back)
        for n, v in ctx.views.items():
            self.theta[n].copy_(theta[n])
            w = v.weight()
            w.copy_(torch.where(back[n], theta[n], theta[n].new_zeros(())).to(w.dtype))
        old_a, self.forward = self.forward, fwd
        ctx.apply(back, _PRUNE)
        ctx.reset_moments({n: back[n] & ~old_b[n] for n in ctx.views})
        n_fwd = sum(ctx.global_count(fwd).values())
        self._forward_density = n_fwd / max(sum(v.numel for v in ctx.views.values()), 1)
        return {"dimred/churn": ctx.churn(old_b, back), "dimred/topkast/forward_churn": ctx.churn(old_a, fwd),
                "dimred/topkast/forward_density": self._forward_density}

    def _penalize(self, ctx: MethodContext, step: int) -> None:
        coef = float(self.config.penalty)
        if coef == 0.0:
            return
        for n, v in ctx.views.items():
            g = v.grad()
            if g is None:
                raise RuntimeError(f"topkast needs the gradient of {n} at step {step}, but it has none")
            w = v.weight().float()
            pull = torch.where(self.forward[n], w, w / self.recipe.density) * coef
            g.add_(pull.masked_fill_(~ctx.state[n].keep, 0.0).to(g.dtype))

    def _hide(self, ctx: MethodContext, views: dict) -> bool:
        """The store takes the values of B \\ A, which become 0 in the weights; True if any was hidden."""
        wrote = False
        for n, v in views.items():
            if n not in ctx.views:
                continue
            hidden = self._hidden(ctx, n)
            w = v.weight()
            self.theta[n][hidden] = w[hidden].float()
            w.masked_fill_(hidden, 0.0)
            wrote = True
        return wrote

    @torch.no_grad()
    def after_step(self, ctx: MethodContext, step: int) -> bool:
        if self.recipe.sparsity == 0.0:
            return False
        return self._hide(ctx, ctx.written_views())

    def metrics(self) -> dict[str, float]:
        total, largest = getattr(self, "_bytes", (0, 0))
        return {"dimred/topkast/state_bytes": float(total), "dimred/topkast/state_bytes_max": float(largest),
                "dimred/topkast/forward_density": float(getattr(self, "_forward_density", 1.0))}

    # ---- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"forward_density": self._forward_density}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        extra = sorted(set(sd) - {"forward_density"})
        if extra:
            raise ValueError(f"topkast keeps no state {extra}")
        self._forward_density = float(sd.get("forward_density", 1.0))

    def tensor_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """``theta`` (fp32 values, current for entries outside A) and ``forward`` (A) over each view's
        local range; they reshard like the masks."""
        return {"theta": dict(self.theta), "forward": dict(self.forward)}

    def load_tensor_state(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        if sorted(tensors) != ["forward", "theta"]:
            raise ValueError(f"topkast: the checkpoint's method tensors are {sorted(tensors)}, expected forward, theta")
        for n, t in tensors["theta"].items():
            self.theta[n].copy_(t.float().to(self.theta[n].device))
        for n, t in tensors["forward"].items():
            self.forward[n].copy_(t.bool().to(self.forward[n].device))
