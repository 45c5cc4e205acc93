"""MEST: Yuan et al., 2021, "MEST: Accurate and Fast Memory-Economic Sparse Training Framework on the
Edge", its Elastic Mutation (MEST+EM), following the public code's settings (``LOWER_BOUND`` /
``UPPER_BOUND`` sparsities, ``MASK_UPDATE_DECAY_EPOCH``, ``SP_MASK_UPDATE_FREQ``).

The topology starts from the largest |w| of the initialized model within the layer budgets (the
public code prunes the initialized dense weights by magnitude; ``init: random`` draws it at random).
At every update of a ``periodic`` schedule (the paper: every 5 of 160 epochs) each layer *mutates* a
fixed fraction of its size: it removes ``int(r * numel)`` of its active entries with the smallest
``|w| + lambda * |g|`` (to the public scripts' lower bound, e.g. 92% for a 90% target) and regrows as
many inactive entries uniformly at random (back to the upper bound, 90%), at 0 with zero optimizer
moments. The mutation ratio ``r`` decays stepwise: ``mutation_ratios`` [0.02, 0.01, 0.0] change at
``decay_fractions`` [0.5625, 0.75] of training (epochs 90 and 120 of 160); at 0 updates stop.

Where this differs: the paper scores by ``|w| + lambda |g|``; the public scripts run with the
magnitude alone, the default ``grad_weight`` 0 here. Random regrowth draws counter-based keys (the
same on every rank and world size) instead of ``torch.rand``; entries removed in an update may be
regrown in it, as in the other drop-and-regrow methods. The soft memory bound (MEST+EM&S: grow first
to a lower sparsity, then prune back) is not built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from dimred_dist.core.registry import register_method
from dimred_dist.distributed.views import ShardView
from dimred_dist.methods.base import MethodContext
from dimred_dist.methods.dynamic import SET, DynamicConfig
from dimred_dist.methods.static import magnitude_scores


@dataclass(kw_only=True)
class MESTConfig(DynamicConfig):
    """Attributes:
        mutation_ratios: Fractions of each layer's size mutated per update, one per phase.
        decay_fractions: Fractions of training at which the next phase starts (one fewer than ratios).
        grad_weight: lambda of the removal score ``|w| + lambda * |g|``.
    """

    init: str = "magnitude"
    mutation_ratios: list[float] = field(default_factory=lambda: [0.02, 0.01, 0.0])
    decay_fractions: list[float] = field(default_factory=lambda: [0.5625, 0.75])
    grad_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        r, d = list(self.mutation_ratios), list(self.decay_fractions)
        if not r or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= x < 1.0 for x in r):
            raise ValueError(f"mutation_ratios must be a non-empty list of fractions in [0, 1), got {r!r}")
        if len(d) != len(r) - 1 or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in d) \
                or any(not 0.0 < x < 1.0 for x in d) or d != sorted(set(d)):
            raise ValueError(f"decay_fractions must be {len(r) - 1} increasing fractions in (0, 1) (one fewer than "
                             f"mutation_ratios {r}), got {d!r}")
        g = self.grad_weight
        if isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0.0:
            raise ValueError(f"grad_weight must be a number >= 0, got {g!r}")


@register_method("mest")
class MEST(SET):
    config_cls = MESTConfig
    default_schedule: ClassVar[dict[str, Any]] = {
        "kind": "periodic", "interval": 100, "decay": "constant", "end_fraction": 1.0, "skip_step": False,
    }

    def setup(self, ctx: MethodContext) -> None:
        super().setup(ctx)
        if not self.schedule.regrows:
            raise ValueError(f"mest mutates on a periodic schedule, not on a {self.schedule.kind!r} one")

    def ratio(self, step: int, total_steps: int) -> float:
        """The mutation ratio of the update before ``step``."""
        phase = sum(1 for f in self.config.decay_fractions if step >= int(f * total_steps))
        return float(self.config.mutation_ratios[phase])

    def drop_counts(self, ctx: MethodContext, step: int, n_active: dict[str, int]) -> tuple[float, dict[str, int]]:
        """``int(r * numel)`` per layer (at most its active entries); the logged fraction is ``r``."""
        r = self.ratio(step, ctx.total_steps)
        return r, {n: min(c, int(r * ctx.views[n].numel)) for n, c in n_active.items()}

    def scores(self, view: ShardView, ctx: MethodContext) -> torch.Tensor:
        lam = float(self.config.grad_weight)
        if lam == 0.0:
            return magnitude_scores(view)
        g = view.grad()
        if g is None:
            raise RuntimeError(f"mest (grad_weight {lam}) needs the gradient of {view.name}, but it has none")
        return view.weight().detach().float().abs() + lam * g.detach().float().abs()
