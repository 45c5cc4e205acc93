"""GraNet: Liu et al., 2021, "Sparse Training via Boosting Pruning Plasticity with Neuroregeneration",
following its reference code (VITA-Group/GraNet, ``sparselearning/core.py``).

Gradual magnitude pruning with zero-initialized gradient regrowth, on a ``cubic`` schedule (the
density schedule of Zhu & Gupta from ``1 - initial_sparsity`` to the recipe's density):

* at each of the schedule's pruning steps the smallest-|w| active entries are pruned to the step's
  density (``distribution: global`` in the shipped recipe: one magnitude ranking over all layers, as
  the reference's ``pruning()``), and in the same step each layer drops ``ceil(p * n_active)`` more of
  its smallest-|w| active entries and regrows as many inactive ones (just-pruned ones included) with
  the largest |gradient|, at 0 with zero optimizer moments (the reference's ``truncate_weights``);
* after the pruning phase the drop-and-regrow step continues every ``interval`` steps until
  ``regrow_end_fraction`` of training, at constant density (RigL-like);
* the drop fraction ``p`` decays by a cosine from ``swap_fraction`` (0.5) to ``min_swap_fraction``
  (0.005) over the planned steps, as the reference's CosineAnnealingLR stepped every iteration.

The initial topology is dense when ``initial_sparsity`` is 0 (the paper's dense-to-sparse GraNet);
otherwise random within the layer budgets (its sparse-to-sparse variant, ERK in the reference). Where
this differs from the reference: its topology update follows the optimizer step of the same
gradient, so a regrown entry stays 0 until the next step; here the update comes before that step
(``skip_step`` is false), so the step's gradient moves the regrown entries once more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dimred_dist.core.config import MethodConfig
from dimred_dist.core.registry import register_method
from dimred_dist.distributed.views import ShardView
from dimred_dist.methods.base import MethodContext
from dimred_dist.methods.dynamic import RigL
from dimred_dist.methods.static import magnitude_scores, random_scores


@dataclass(kw_only=True)
class GraNetConfig(MethodConfig):
    """Attributes:
        swap_fraction: Drop fraction of the first drop-and-regrow step (0.5).
        min_swap_fraction: The cosine's floor at the end of training (0.005).
        regrow_end_fraction: Drop-and-regrow steps stop at this fraction of the planned steps.
    """

    swap_fraction: float = 0.5
    min_swap_fraction: float = 0.005
    regrow_end_fraction: float = 1.0

    def __post_init__(self) -> None:
        for label in ("swap_fraction", "min_swap_fraction", "regrow_end_fraction"):
            v = getattr(self, label)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{label} must be in [0, 1], got {v!r}")
        if self.min_swap_fraction > self.swap_fraction:
            raise ValueError(f"min_swap_fraction {self.min_swap_fraction} is above swap_fraction {self.swap_fraction}")


@register_method("granet")
class GraNet(RigL):
    config_cls = GraNetConfig
    default_schedule: ClassVar[dict[str, Any]] = {"kind": "cubic", "interval": 100, "end_fraction": 0.75}

    def setup(self, ctx: MethodContext) -> None:
        super().setup(ctx)
        if self.schedule.kind != "cubic":
            raise ValueError(f"granet prunes on a cubic schedule, not on a {self.schedule.kind!r} one")

    @property
    def dynamic(self) -> bool:
        return True

    def init_scores(self, view: ShardView, ctx: MethodContext) -> torch.Tensor:
        return random_scores(self.recipe.seed, view)

    def scores(self, view: ShardView, ctx: MethodContext) -> torch.Tensor:
        return magnitude_scores(view)

    def drop_counts(self, ctx: MethodContext, step: int, n_active: dict[str, int]) -> tuple[float, dict[str, int]]:
        """The cosine-decayed fraction and ``ceil(p * n_active)`` per layer (the reference rounds up)."""
        c = self.config
        p = c.min_swap_fraction + (c.swap_fraction - c.min_swap_fraction) * (
            1.0 + math.cos(math.pi * step / ctx.total_steps)) / 2.0
        return p, {n: math.ceil(p * a) for n, a in n_active.items()}

    def _regrow_step(self, step: int, total: int) -> bool:
        end = int(math.floor(total * self.config.regrow_end_fraction))
        return step > 0 and step < end and step % self.schedule.interval == 0

    @torch.no_grad()
    def update(self, ctx: MethodContext, step: int) -> dict[str, float] | None:
        if self.recipe.sparsity == 0.0:
            return None
        total = ctx.total_steps
        prune = self.schedule.is_update_step(step, total)
        if not prune and not self._regrow_step(step, total):
            return None
        before = ctx.active_masks(self.init_state)
        out: dict[str, float] = {}
        if prune:
            out.update(self.prune_to(ctx, self.schedule.density(step, total, self.recipe.density)) or {})
        out.update(self.rewire(ctx, step) or {})
        if not out:
            return None
        out["dimred/churn"] = ctx.churn(before, ctx.active_masks(self.init_state))
        return out
