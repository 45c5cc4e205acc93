"""Scores that need no data: random and magnitude, for pruning and for freezing.

* ``random``: uniformly random entries per layer (ERK / uniform budgets) - the baseline of
  Liu et al., 2022, "The Unreasonable Effectiveness of Random Pruning".
* ``magnitude``: largest |w| (magnitude pruning at initialization; Frankle et al., 2021, "Pruning
  Neural Networks at Initialization: Why Are We Missing the Mark?"). With a ``cubic`` schedule it is
  gradual magnitude pruning (Zhu & Gupta, 2017), with an ``imp`` schedule iterative magnitude
  pruning (Frankle & Carbin, 2019).
* ``random_freeze``: element-wise random freezing at initialization (Wimmer et al., 2020,
  "FreezeNet" baseline): the unselected entries keep their initial value instead of becoming 0.

With the default ``one_shot`` schedule the topology is chosen at initialization and held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dimred_dist.core.config import MethodConfig
from dimred_dist.core.registry import register_method
from dimred_dist.core.rng import random_uint32
from dimred_dist.core.state import ElementState
from dimred_dist.distributed.views import ShardView
from dimred_dist.methods.base import Method, MethodContext


@dataclass(kw_only=True)
class StaticConfig(MethodConfig):
    """These methods take no hyper-parameters beyond the recipe's sparsity, distribution and schedule."""


def random_scores(seed: int, view: ShardView, step: int = 0) -> torch.Tensor:
    """Counter-based random scores of the view's entries (the same on every rank and world size)."""
    return random_uint32(seed, step, view.name, view.start, view.end)


def magnitude_scores(view: ShardView) -> torch.Tensor:
    """|w| of the view's local (fp32 master) entries."""
    return view.weight().detach().abs()


@register_method("random")
class RandomPruning(Method):
    config_cls = StaticConfig

    def scores(self, view: ShardView, ctx: MethodContext) -> torch.Tensor:
        return random_scores(self.recipe.seed, view)


@register_method("magnitude")
class MagnitudePruning(Method):
    config_cls = StaticConfig

    def scores(self, view: ShardView, ctx: MethodContext) -> torch.Tensor:
        return magnitude_scores(view)


@register_method("random_freeze")
class RandomFreezing(RandomPruning):
    init_state = ElementState.FREEZE
