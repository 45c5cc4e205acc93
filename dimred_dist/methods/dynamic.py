"""Dynamic sparse training: drop the weakest active weights, regrow as many elsewhere.

* ``set``: Mocanu et al., 2018, "Scalable training of artificial neural networks with adaptive
  sparse connectivity inspired by network science" - drop smallest |w|, regrow uniformly at random.
* ``rigl``: Evci et al., 2020, "Rigging the Lottery: Making All Tickets Winners" - SET with
  regrowth by largest |gradient| (one overridden hook).

Both start from a random topology within the layer budgets (ERK by default) and run on a
``periodic`` schedule (:class:`~dimred_dist.core.schedules.PeriodicSchedule`): every ``interval``
steps until ``end_fraction`` of training, each layer drops ``int(drop_fraction_t * n_active)`` of its
active entries (RigL's code truncates) with the drop fraction decayed by a cosine (RigL) or held
constant (SET), and regrows as many. Regrown entries start at 0 with zero optimizer moments, and the
optimizer does not step on an update step (RigL's Algorithm 1; ``schedule.skip_step: false`` keeps
the step). Entries dropped in an update may be regrown in the same update (as in the reference
implementations). The update itself is :meth:`~dimred_dist.methods.base.Method.rewire`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dimred_dist.core.config import MethodConfig
from dimred_dist.core.registry import register_method
from dimred_dist.distributed.views import ShardView
from dimred_dist.methods.base import Method, MethodContext
from dimred_dist.methods.static import magnitude_scores, random_scores


@dataclass(kw_only=True)
class DynamicConfig(MethodConfig):
    """Hyper-parameters of dynamic sparse training beyond its schedule.

    Attributes:
        init: Initial topology: ``random`` (training from scratch, as in the papers) or ``magnitude``
            (largest |w|: fine-tuning a pretrained model keeps its strongest weights).
    """

    init: str = "random"

    def __post_init__(self) -> None:
        if self.init not in ("random", "magnitude"):
            raise ValueError(f"init must be 'random' or 'magnitude', got {self.init!r}")


@register_method("set")
class SET(Method):
    """Drop smallest |w| among active entries, regrow uniformly at random among inactive ones."""

    config_cls = DynamicConfig
    default_schedule: ClassVar[dict[str, Any]] = {"kind": "periodic", "decay": "constant"}

    def init_scores(self, view: ShardView, ctx: MethodContext) -> torch.Tensor:
        if self.config.init == "magnitude":
            return magnitude_scores(view)
        return random_scores(self.recipe.seed, view)

    def scores(self, view: ShardView, ctx: MethodContext) -> torch.Tensor:
        return magnitude_scores(view)


@register_method("rigl")
class RigL(SET):
    """SET with regrowth by largest gradient magnitude (the dense gradient of pruned entries)."""

    default_schedule: ClassVar[dict[str, Any]] = {"kind": "periodic", "decay": "cosine"}

    def grow_scores(self, view: ShardView, ctx: MethodContext, step: int) -> torch.Tensor:
        g = view.grad()
        if g is None:
            raise RuntimeError(f"RigL needs the gradient of {view.name} at step {step}, but it has none")
        return g.detach().abs()
