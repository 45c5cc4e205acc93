"""Static sparsity and freezing decided once at initialization and held for the whole run.

* ``random``: uniformly random entries per layer (ERK / uniform budgets) - the baseline of
  Liu et al., 2022, "The Unreasonable Effectiveness of Random Pruning".
* ``magnitude``: largest |w| at initialization (magnitude pruning at init; Frankle et al., 2021,
  "Pruning Neural Networks at Initialization: Why Are We Missing the Mark?").
* ``random_freeze``: element-wise random freezing at initialization (Wimmer et al., 2020,
  "FreezeNet" baseline): the unselected entries keep their initial value instead of becoming 0.
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
    """Static methods take no hyper-parameters beyond the recipe's sparsity and distribution."""


@register_method("random")
class RandomPruning(Method):
    config_cls = StaticConfig

    def init_scores(self, view: ShardView, ctx: MethodContext) -> torch.Tensor:
        return random_uint32(self.recipe.seed, 0, view.name, view.start, view.end)


@register_method("magnitude")
class MagnitudePruning(Method):
    config_cls = StaticConfig

    def init_scores(self, view: ShardView, ctx: MethodContext) -> torch.Tensor:
        return view.weight().detach().abs()


@register_method("random_freeze")
class RandomFreezing(RandomPruning):
    init_state = ElementState.FREEZE
