"""The lifecycle every method shares, and the hooks a method overrides.

A method is a policy: at chosen steps it scores the entries it can see (through shard views) and
moves entries between TRAIN, FREEZE and PRUNE. The lifecycle is:

1. :meth:`Method.initialize` once before the first step: score every entry with
   :meth:`Method.init_scores`, keep the best ones within the layer-wise budget, and turn the others
   into :attr:`Method.init_state` (PRUNE for pruning methods, FREEZE for freezing methods);
2. before each optimizer step for which :meth:`Method.is_update_step` is true,
   :meth:`Method.update` changes the topology (dynamic methods).

Selection is exact and identical on every rank and world size (see
:mod:`dimred_dist.distributed.topk`); random scores come from :mod:`dimred_dist.core.rng`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from dimred_dist.core.config import MethodConfig, Recipe
from dimred_dist.core.state import DimRedState, ElementState
from dimred_dist.distributed.collectives import Collectives
from dimred_dist.distributed.topk import Segment, exact_topk_masks
from dimred_dist.distributed.views import ShardView


@dataclass
class MethodContext:
    """Everything a method may look at: views, state, collectives and the layer budgets.

    Attributes:
        views: Shard view per managed parameter, in model order.
        state: The TRAIN / FREEZE / PRUNE state over each view's local range.
        coll: Collectives over the ranks that share the parameters.
        keep_counts: Entries kept (not pruned / not frozen) per layer at the target density.
        global_budget: If True, one top-k across all layers decides instead of per-layer counts.
        total_steps: Length of training in optimizer steps (for schedules).
        regrown: Local masks of entries a topology update (re)grew; their optimizer moments restart
            at zero. Filled by methods, consumed and cleared by the manager.
    """

    views: dict[str, ShardView]
    state: DimRedState
    coll: Collectives
    keep_counts: dict[str, int]
    global_budget: bool
    total_steps: int
    regrown: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(
        self,
        scores: dict[str, torch.Tensor],
        counts: dict[str, int],
        eligible: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Local masks of the ``counts[name]`` highest-scoring (eligible) entries of every layer.

        With a global budget the counts are summed and one selection runs over all layers (ties
        broken by layer order, then flat index).
        """
        names = list(self.views)
        eligible = eligible or {}
        segments: list[Segment] = []
        if self.global_budget:
            offset = 0
            for name in names:
                v = self.views[name]
                segments.append(Segment(0, offset + v.start, scores[name], eligible.get(name)))
                offset += v.numel
            masks = exact_topk_masks(segments, [offset], [sum(counts[n] for n in names)], self.coll)
        else:
            for i, name in enumerate(names):
                v = self.views[name]
                segments.append(Segment(i, v.start, scores[name], eligible.get(name)))
            sizes = [self.views[n].numel for n in names]
            masks = exact_topk_masks(segments, sizes, [counts[n] for n in names], self.coll)
        return dict(zip(names, masks))

    def global_count(self, local: dict[str, torch.Tensor]) -> dict[str, int]:
        """Per-layer sums over ranks of local bool masks (one small all-reduce)."""
        names = list(self.views)
        t = torch.tensor([int(local[n].sum()) for n in names], dtype=torch.int64)
        return dict(zip(names, self.coll.all_reduce_sum(t).tolist()))


class Method:
    """Base lifecycle. Subclasses override :meth:`init_scores` and, if dynamic, the update hooks."""

    method_name: ClassVar[str] = "base"
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    #: What the entries that are not selected at initialization become.
    init_state: ClassVar[ElementState] = ElementState.PRUNE
    #: True if the topology changes during training (the manager then tracks the ITOP rate).
    dynamic: ClassVar[bool] = False

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.config = recipe.args

    # ---- hooks ---------------------------------------------------------------------------
    def init_scores(self, view: ShardView, ctx: MethodContext) -> torch.Tensor:
        """Scores of the local entries at initialization; the highest are kept."""
        raise NotImplementedError(f"{type(self).__name__} must define init_scores")

    def is_update_step(self, step: int) -> bool:
        """Whether :meth:`update` runs before optimizer step ``step`` (0-based). Static: never."""
        return False

    def update(self, ctx: MethodContext, step: int) -> dict[str, float]:
        """Change the topology before optimizer step ``step``; returns flat metrics."""
        return {}

    # ---- lifecycle -----------------------------------------------------------------------
    def initialize(self, ctx: MethodContext) -> None:
        """Select the initial TRAIN entries within the layer budgets."""
        if self.recipe.sparsity == 0.0:
            return
        scores = {name: self.init_scores(v, ctx) for name, v in ctx.views.items()}
        selected = ctx.select(scores, ctx.keep_counts)
        for name, mask in selected.items():
            ps = ctx.state[name]
            if self.init_state is ElementState.PRUNE:
                ps.set_keep(mask)
            else:
                ps.set_train(mask)

    def state_dict(self) -> dict[str, Any]:
        """Schedule state of the method (plain data). Stateless by default."""
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd:
            raise ValueError(f"{type(self).__name__} keeps no state but got keys {sorted(sd)}")


def default_end_step(total_steps: int, end_fraction: float) -> int:
    """The step at which topology updates stop: ``end_fraction`` of training, at least 1."""
    return max(1, int(math.floor(total_steps * end_fraction)))
