"""Dynamic sparse training: drop the weakest active weights, regrow as many elsewhere.

* ``set``: Mocanu et al., 2018, "Scalable training of artificial neural networks with adaptive
  sparse connectivity inspired by network science" - drop smallest |w|, regrow uniformly at random.
* ``rigl``: Evci et al., 2020, "Rigging the Lottery: Making All Tickets Winners" - SET with
  regrowth by largest |gradient| (one overridden hook).

Both start from a random topology within the layer budgets (ERK by default), update every
``update_interval`` steps until ``end_fraction`` of training, and drop
``drop_fraction * (1 + cos(pi * t / T_end)) / 2`` of each layer's active entries (cosine decay) or a
constant fraction. Regrown entries start at 0 with zero optimizer moments. Entries dropped in an
update may be regrown in the same update (as in the reference implementations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dimred_dist.core.config import MethodConfig
from dimred_dist.core.registry import register_method
from dimred_dist.core.rng import random_uint32
from dimred_dist.core.schedules import ConstantValue, CosineDecay, PeriodicUpdate
from dimred_dist.distributed.views import ShardView
from dimred_dist.methods.base import MethodContext, default_end_step
from dimred_dist.methods.static import RandomPruning


@dataclass(kw_only=True)
class DynamicConfig(MethodConfig):
    """Hyper-parameters of dynamic sparse training.

    Attributes:
        update_interval: Optimizer steps between topology updates (Delta T).
        drop_fraction: Fraction of each layer's active entries dropped at the first update (alpha).
        end_fraction: Updates stop after this fraction of the planned steps (T_end / T).
        decay: ``cosine`` (RigL) or ``constant`` (SET) schedule of the drop fraction.
        init: Initial topology: ``random`` (training from scratch, as in the papers) or ``magnitude``
            (largest |w|: fine-tuning a pretrained model keeps its strongest weights).
    """

    update_interval: int = 100
    drop_fraction: float = 0.3
    end_fraction: float = 0.75
    decay: str = "cosine"
    init: str = "random"

    def __post_init__(self) -> None:
        if self.update_interval < 1:
            raise ValueError(f"update_interval must be >= 1, got {self.update_interval}")
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1], got {self.drop_fraction}")
        if not 0.0 < self.end_fraction <= 1.0:
            raise ValueError(f"end_fraction must be in (0, 1], got {self.end_fraction}")
        if self.decay not in ("cosine", "constant"):
            raise ValueError(f"decay must be 'cosine' or 'constant', got {self.decay!r}")
        if self.init not in ("random", "magnitude"):
            raise ValueError(f"init must be 'random' or 'magnitude', got {self.init!r}")


@register_method("set")
class SET(RandomPruning):
    """Drop smallest |w| among active entries, regrow uniformly at random among pruned ones."""

    config_cls = DynamicConfig
    dynamic = True

    def initialize(self, ctx: MethodContext) -> None:
        if ctx.total_steps < 1:
            raise ValueError(
                f"{self.method_name} needs the planned number of steps (total_steps), got {ctx.total_steps}"
            )
        cfg = self.config
        end = default_end_step(ctx.total_steps, cfg.end_fraction)
        self.schedule = PeriodicUpdate(interval=cfg.update_interval, end=end)
        self.drop = (
            CosineDecay(value=cfg.drop_fraction, end=end)
            if cfg.decay == "cosine"
            else ConstantValue(value=cfg.drop_fraction)
        )
        super().initialize(ctx)

    # ---- hooks ---------------------------------------------------------------------------
    def init_scores(self, view: ShardView, ctx: MethodContext) -> torch.Tensor:
        if self.config.init == "magnitude":
            return view.weight().detach().abs()
        return super().init_scores(view, ctx)

    def drop_scores(self, view: ShardView, ctx: MethodContext) -> torch.Tensor:
        """Active entries with the highest score survive."""
        return view.weight().detach().abs()

    def grow_scores(self, view: ShardView, ctx: MethodContext, step: int) -> torch.Tensor:
        """Pruned entries with the highest score are regrown."""
        return random_uint32(self.recipe.seed, step, view.name, view.start, view.end, salt=1)

    # ---- lifecycle -----------------------------------------------------------------------
    def is_update_step(self, step: int) -> bool:
        return self.schedule.is_update_step(step)

    @torch.no_grad()
    def update(self, ctx: MethodContext, step: int) -> dict[str, float]:
        frac = self.drop(step)
        old = {n: ctx.state[n].keep.clone() for n in ctx.views}
        n_active = ctx.global_count(old)
        n_drop = {n: int(round(frac * n_active[n])) for n in ctx.views}
        survivors = ctx.select(
            {n: self.drop_scores(v, ctx) for n, v in ctx.views.items()},
            {n: n_active[n] - n_drop[n] for n in ctx.views},
            eligible=old,
        )
        grown = ctx.select(
            {n: self.grow_scores(v, ctx, step) for n, v in ctx.views.items()},
            n_drop,
            eligible={n: ~m for n, m in survivors.items()},
        )
        changed = torch.zeros(1, dtype=torch.int64)
        for name, v in ctx.views.items():
            v.weight()[grown[name]] = 0.0
            ctx.state[name].set_keep(survivors[name] | grown[name])
            ctx.regrown[name] = grown[name]
            changed += int((ctx.state[name].keep ^ old[name]).sum())
        total = sum(v.numel for v in ctx.views.values())
        changed_total = int(ctx.coll.all_reduce_sum(changed))
        return {"dimred/churn": changed_total / total, "dimred/drop_fraction": frac}


@register_method("rigl")
class RigL(SET):
    """SET with regrowth by largest gradient magnitude (the dense gradient of pruned entries)."""

    def grow_scores(self, view: ShardView, ctx: MethodContext, step: int) -> torch.Tensor:
        g = view.grad()
        if g is None:
            raise RuntimeError(f"RigL needs the gradient of {view.name} at step {step}, but it has none")
        return g.detach().abs()
