"""Supermasks by edge-popup: Ramanujan, Wortsman, Kembhavi, Farhadi & Rastegari, 2020, "What's Hidden in
a Randomly Weighted Neural Network?", following its reference code (allenai/hidden-networks,
``GetSubnet``, ``SubnetConv``); Zhou et al., 2019, "Deconstructing Lottery Tickets: Zeros, Signs,
and the Supermask", is the idea of training a mask over frozen random weights.

The managed weights never train: they FREEZE at their initial values w0. Every entry has a score s;
the forward pass uses w0 on the top-k of |s| per layer (k = the recipe's density, the reference's
``prune_rate`` with the recipe's distribution) and 0 elsewhere (PRUNE). The scores are trained by
the straight-through estimator of the reference code: the gradient of s is ``g * w0 * sign(s)``
with g the dense reduced gradient of the effective weight (pruned entries included), stepped every
optimizer step by the method's own SGD (``score_lr`` 0.1 with a cosine decay over training,
``momentum`` 0.9, ``weight_decay`` 5e-4 on the scores: the reference's ImageNet settings). The top-k
is recomputed after every score step (``interval`` 1: the reference recomputes it in every forward
pass); an entry that enters takes w0 back, one that leaves becomes 0.

Scores start Kaiming-uniform (bound 1 / sqrt(fan_in), as the reference's ``kaiming_uniform_(a=sqrt(5))``)
from counter-based random numbers, so every rank and world size draws the same. Scores, their
momentum and w0 are sharded like the weights: 12 bytes (fp32) per managed entry a rank holds
(``dimred/edge_popup/state_bytes``, all ranks; ``.../state_bytes_max``, the largest), checkpointed by
global range. The optimizer holds nothing for managed entries (none is TRAIN).

Where this differs: unmanaged trainable parameters (biases, norms, the head) train with the model's
optimizer as usual; name them in the recipe's ``freeze`` list for the paper's pure supermask. The
weights are the model's own initialization, not the paper's signed Kaiming constant. A step whose
gradients are not finite on some rank (fp16 overflow) leaves the scores unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dimred_dist.core.config import MethodConfig, Recipe
from dimred_dist.core.registry import register_method
from dimred_dist.core.rng import random_uniform
from dimred_dist.core.state import ElementState
from dimred_dist.methods.base import Method, MethodContext


@dataclass(kw_only=True)
class EdgePopupConfig(MethodConfig):
    """Attributes:
        score_lr: Learning rate of the scores' SGD.
        lr_decay: ``cosine`` (to 0 at the end of training, the reference's) or ``constant``.
        momentum: SGD momentum of the scores.
        weight_decay: L2 weight decay on the scores.
        interval: The top-k is recomputed before every ``interval``-th step.
    """

    score_lr: float = 0.1
    lr_decay: str = "cosine"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    interval: int = 1

    def __post_init__(self) -> None:
        for label in ("score_lr", "momentum", "weight_decay"):
            v = getattr(self, label)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0.0:
                raise ValueError(f"{label} must be a number >= 0, got {v!r}")
        if self.score_lr == 0.0 or self.momentum >= 1.0:
            raise ValueError(f"score_lr must be > 0 and momentum < 1, got {self.score_lr!r} and {self.momentum!r}")
        if self.lr_decay not in ("cosine", "constant"):
            raise ValueError(f"lr_decay must be 'cosine' or 'constant', got {self.lr_decay!r}")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {self.interval!r}")


def fan_in(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)


@register_method("edge_popup")
class EdgePopup(Method):
    config_cls = EdgePopupConfig

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        if recipe.sparsity == 0.0:
            raise ValueError("edge_popup chooses a subnetwork of the frozen weights: give a sparsity above 0 "
                             "(the paper's best is 0.5)")

    @property
    def dynamic(self) -> bool:
        return True

    def setup(self, ctx: MethodContext) -> None:
        super().setup(ctx)
        self.require_no_schedule("edge_popup recomputes its top-k every `args.interval` steps; give no `schedule`")
        zeros = {n: torch.zeros(v.local_numel, dtype=torch.float32, device=v.weight().device)
                 for n, v in ctx.views.items()}
        self.w0 = {n: t.clone() for n, t in zeros.items()}
        self.scores = {n: t.clone() for n, t in zeros.items()}
        self.buf = {n: t.clone() for n, t in zeros.items()}
        self._bytes = ctx.state_bytes(12)
        self._lr = float(self.config.score_lr)

    @torch.no_grad()
    def initialize(self, ctx: MethodContext) -> None:
        for n, v in ctx.views.items():
            self.w0[n].copy_(v.weight().float())
            bound = 1.0 / math.sqrt(fan_in(v.shape))
            u = random_uniform(self.recipe.seed, 0, n, v.start, v.end, salt=7)
            self.scores[n].copy_(((2.0 * u - 1.0) * bound).float())
        self._select(ctx)

    def score_lr(self, step: int, total_steps: int) -> float:
        """The scores' learning rate at optimizer step ``step``."""
        lr = float(self.config.score_lr)
        if self.config.lr_decay == "constant" or total_steps <= 0:
            return lr
        return 0.5 * lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    @torch.no_grad()
    def observe(self, ctx: MethodContext, step: int) -> None:
        """One SGD step of the scores on ``g * w0 * sign(s)`` (the straight-through gradient)."""
        if not ctx.grads_finite(step, "edge_popup"):
            return
        self._lr = lr = self.score_lr(step, ctx.total_steps)
        mu, wd = float(self.config.momentum), float(self.config.weight_decay)
        for n, v in ctx.views.items():
            s = self.scores[n]
            d = v.grad().float().to(s.device) * self.w0[n] * torch.sign(s)
            if wd:
                d.add_(s, alpha=wd)
            self.buf[n].mul_(mu).add_(d)
            s.add_(self.buf[n], alpha=-lr)

    @torch.no_grad()
    def update(self, ctx: MethodContext, step: int) -> dict[str, float] | None:
        """After the score step: the new top-k (None if it did not change)."""
        if step % self.config.interval != 0:
            return None
        return self._select(ctx)

    def _select(self, ctx: MethodContext) -> dict[str, float] | None:
        old = ctx.active_masks(ElementState.PRUNE)
        keep = ctx.select({n: s.abs() for n, s in self.scores.items()}, ctx.keep_counts)
        churn = ctx.churn(old, keep)
        if churn == 0.0 and all(bool((~ps.train).all()) for ps in ctx.state):
            return None
        for n, v in ctx.views.items():
            w = v.weight()
            w.copy_(torch.where(keep[n], self.w0[n], self.w0[n].new_zeros(())).to(w.dtype))
        ctx.apply(keep, ElementState.PRUNE)
        ctx.apply({n: torch.zeros_like(k) for n, k in keep.items()}, ElementState.FREEZE)
        return {"dimred/churn": churn}

    def metrics(self) -> dict[str, float]:
        total, largest = getattr(self, "_bytes", (0, 0))
        return {"dimred/edge_popup/state_bytes": float(total), "dimred/edge_popup/state_bytes_max": float(largest),
                "dimred/edge_popup/score_lr": float(getattr(self, "_lr", self.config.score_lr))}

    # ---- persistence ---------------------------------------------------------------------
    def tensor_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """``w0``, ``scores`` and ``momentum`` (fp32) over each view's local range; they reshard."""
        return {"w0": dict(self.w0), "scores": dict(self.scores), "momentum": dict(self.buf)}

    def load_tensor_state(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        if sorted(tensors) != ["momentum", "scores", "w0"]:
            raise ValueError(f"edge_popup: the checkpoint's method tensors are {sorted(tensors)}, expected "
                             "momentum, scores, w0")
        for key, dst in (("w0", self.w0), ("scores", self.scores), ("momentum", self.buf)):
            for n, t in tensors[key].items():
                dst[n].copy_(t.float().to(dst[n].device))
