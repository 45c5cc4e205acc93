"""Lottery tickets: iterative magnitude pruning with rewinding, and early-bird tickets.

* ``imp``: Frankle & Carbin, 2019, "The Lottery Ticket Hypothesis": magnitude scores on the ``imp``
  schedule (:class:`~dimred_dist.core.schedules.IMPSchedule`): ``rounds`` rounds of train, prune
  ``prune_fraction`` of the remaining entries, rewind, inside one training run. Rewinding is to the
  weights of step ``rewind_step`` (Frankle et al., 2020) or only the LR schedule (Renda et al., 2020),
  see :mod:`dimred_dist.methods.rewind`; the optimizer restarts every round (as in open_lth). ``imp``
  is ``magnitude`` with that default schedule; any method runs on an ``imp`` schedule.
* ``early_bird``: You et al., 2020, "Drawing Early-Bird Tickets": train densely; every ``interval``
  steps draw the magnitude mask at the target density and compare it with the ``window - 1`` masks
  drawn before (normalized Hamming distance, as in the official code: the newest against each older
  one); once all those distances are below ``threshold`` the ticket has emerged and is applied, and
  training continues from the early-bird weights (fine-tuning the ticket). The paper draws channel
  masks from BatchNorm scales; here the mask is unstructured magnitude over the managed entries.
  While searching, each remembered mask costs 1 byte per managed entry of the rank (``window - 1``
  of them); they are freed when the ticket is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dimred_dist.core.config import MethodConfig
from dimred_dist.core.registry import register_method
from dimred_dist.methods.base import MethodContext
from dimred_dist.methods.static import MagnitudePruning, StaticConfig


@register_method("imp")
class IterativeMagnitudePruning(MagnitudePruning):
    """Magnitude scores on the ``imp`` schedule by default."""

    config_cls = StaticConfig
    default_schedule: ClassVar[dict[str, Any]] = {"kind": "imp"}


@dataclass(kw_only=True)
class EarlyBirdConfig(MethodConfig):
    """Attributes:
        interval: Optimizer steps between two mask draws (the paper: one epoch).
        window: Masks compared (the newest and ``window - 1`` before it; 5 in the official code).
        threshold: The ticket emerges when every distance in the window is below it (0.1).
    """

    interval: int = 100
    window: int = 5
    threshold: float = 0.1

    def __post_init__(self) -> None:
        for label, v, low in (("interval", self.interval, 1), ("window", self.window, 2)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{label} must be an integer >= {low}, got {v!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {t!r}")


@register_method("early_bird")
class EarlyBird(MagnitudePruning):
    """Dense until the magnitude mask stops changing, then the ticket (see the module docstring)."""

    config_cls = EarlyBirdConfig

    def setup(self, ctx: MethodContext) -> None:
        super().setup(ctx)
        self.require_no_schedule("early_bird chooses its own step; give it no schedule")
        self.masks: list[dict[str, torch.Tensor]] = []  # the remembered draws, oldest first
        self.distances: list[float] = []
        self.drawn_at = -1

    @property
    def dynamic(self) -> bool:
        return True

    def initialize(self, ctx: MethodContext) -> None:
        """Dense: the ticket is drawn during training."""

    def observe(self, ctx: MethodContext, step: int) -> None:
        if self.drawn_at >= 0 or step % self.config.interval or self.recipe.sparsity == 0.0:
            return
        mask = ctx.select({n: v.weight().detach().abs() for n, v in ctx.views.items()}, ctx.keep_counts)
        older = self.masks[-(self.config.window - 1):]
        self.distances = [self._distance(ctx, mask, m) for m in older]
        self.masks = [*older, mask][-(self.config.window - 1):]
        if len(older) == self.config.window - 1 and max(self.distances) < self.config.threshold:
            self.drawn_at = step

    @staticmethod
    def _distance(ctx: MethodContext, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        """Normalized Hamming distance of two masks over all managed entries (one all-reduce)."""
        return ctx.churn(a, b)

    @torch.no_grad()
    def update(self, ctx: MethodContext, step: int) -> dict[str, float] | None:
        if step != self.drawn_at or not self.masks:
            return None
        old = ctx.active_masks(self.init_state)
        ticket = self.masks[-1]
        ctx.apply(ticket, self.init_state)
        self.masks = []  # the search is over: free the remembered masks
        return {"dimred/churn": ctx.churn(old, ticket), "dimred/early_bird_step": float(step)}

    def metrics(self) -> dict[str, float]:
        out = {"dimred/early_bird_drawn": float(self.drawn_at >= 0)}
        if self.distances:
            out["dimred/early_bird_distance"] = max(self.distances)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"drawn_at": self.drawn_at, "distances": self.distances, "n_masks": len(self.masks)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.drawn_at, self.distances = int(sd["drawn_at"]), [float(d) for d in sd["distances"]]

    def tensor_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {f"mask{i}": m for i, m in enumerate(self.masks)}

    def load_tensor_state(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        self.masks = [tensors[f"mask{i}"] for i in range(len(tensors))]
