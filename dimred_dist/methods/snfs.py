"""Sparse momentum (SNFS): Dettmers & Zettlemoyer, 2019, "Sparse Networks from Scratch: Faster
Training without Losing Performance", following its reference code (TimDettmers/sparse_learning,
``sparselearning/core.py``: ``magnitude_death``, ``momentum_growth``, ``momentum`` redistribution).

The topology starts random within the layer budgets (``uniform`` in the shipped recipe, the
reference's ``enforce_density_per_layer``). At every update of a ``periodic`` schedule (the reference
prunes at the end of every epoch with a death rate of 0.5 decayed by a cosine over training):

* **momentum**: an exponential average of each entry's dense reduced gradient, pruned entries
  included, ``m <- beta * m + g`` every optimizer step (the SGD momentum buffer the reference reads;
  ``beta`` = ``momentum``, 0.9);
* **death**: each layer removes ``ceil(p * n_active)`` of its active entries with the smallest |w|;
* **redistribution**: the total removed is regrown across layers in proportion to each layer's mean
  |m| over its active entries (before death), a layer regrowing at most 99% of the entries it could
  (the excess spread evenly over the layers, as in the reference's ``calc_growth_redistribution``);
* **growth**: each layer regrows its share among the non-surviving entries with the largest |m|, at
  0 with zero optimizer moments (just-removed entries compete, as in the reference).

Memory: the momentum is 4 bytes (fp32) for every managed entry a rank holds (its ZeRO partition, or
the whole model under DDP), pruned ones included: the growth criterion needs it for them. The metric
``dimred/snfs/momentum_bytes`` reports it summed over ranks, ``.../momentum_bytes_max`` on the largest
rank. It is checkpointed by global range, so it reshards with the masks.

Where this differs from the reference code: the reference reads the optimizer's buffer (for Adam
``m1 / (sqrt(m2) + 1e-8)``); this project's optimizer keeps moments for TRAIN entries only, so the
method keeps its own average of the dense gradient, whatever the optimizer. The regrowth shares are
rounded to whole entries so that the total regrown equals the total removed exactly (largest
remainders first; the reference floors each share and corrects the shortfall in later updates with
a smoothed ``adjusted_growth``), and the layer means are summed exactly (fixed point, 2**-24 of the
layer's largest |m|) so that every world size and ZeRO stage draws the same counts. The reference
caps the death rate of layers below 20% sparsity whose momentum share is large; not done here. It
resets the optimizer momentum of inactive entries to the layer's mean after an update; here regrown
entries start with zero moments (the method's own average is not reset). A step whose gradients are
not finite on some rank (an fp16 overflow, which DeepSpeed skips) leaves the average unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dimred_dist.core.registry import register_method
from dimred_dist.distributed.views import ShardView
from dimred_dist.methods.base import MethodContext
from dimred_dist.methods.dynamic import SET, DynamicConfig

#: Fixed-point resolution of the exact per-layer sums of |m| (relative to the layer's largest |m|).
_FIXED = 2**24


@dataclass(kw_only=True)
class SNFSConfig(DynamicConfig):
    """Attributes:
        momentum: beta of the gradient average ``m <- beta * m + g`` (0.9, the reference's SGD momentum).
        redistribution: ``momentum`` (the paper's, by mean |m| over active entries) or ``none`` (each
            layer regrows what it removed).
        max_fill: A layer regrows at most this fraction of the entries it could regrow (0.99).
    """

    momentum: float = 0.9
    redistribution: str = "momentum"
    max_fill: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        for label in ("momentum", "max_fill"):
            v = getattr(self, label)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
                raise ValueError(f"{label} must be in (0, 1], got {v!r}")
        if self.redistribution not in ("momentum", "none"):
            raise ValueError(f"redistribution must be 'momentum' or 'none', got {self.redistribution!r}")


def redistribute(shares: list[float], total: int, caps: list[int]) -> list[int]:
    """Whole regrowth counts: ``total`` split in proportion to ``shares`` (summing to 1), no layer above
    its cap; a capped layer's excess is spread evenly over all layers until none is left (the
    reference's loop), then the counts are floored and the remainder goes one by one to the layers
    below their caps with the largest fractional parts (ties: layer order)."""
    want = [s * total for s in shares]
    alloc = [0.0] * len(shares)
    mean_residual = 0.0
    for _ in range(1000):
        residual = 0.0
        for i, w in enumerate(want):
            r = w + mean_residual
            if r > caps[i]:
                alloc[i] = float(caps[i])
                residual += r - caps[i]
            else:
                alloc[i] = r
        want = alloc[:]
        mean_residual = residual / len(shares)
        if residual <= 0.0:
            break
    counts = [min(caps[i], int(math.floor(a))) for i, a in enumerate(alloc)]
    short = total - sum(counts)
    order = sorted(range(len(shares)), key=lambda i: (-(alloc[i] - math.floor(alloc[i])), i))
    while short > 0:
        open_ = [i for i in order if counts[i] < caps[i]]
        if not open_:
            break
        for i in open_[:short]:
            counts[i] += 1
        short = total - sum(counts)
    return counts


@register_method("snfs")
class SNFS(SET):
    config_cls = SNFSConfig
    default_schedule: ClassVar[dict[str, Any]] = {
        "kind": "periodic", "interval": 100, "drop_fraction": 0.5, "decay": "cosine", "end_fraction": 1.0,
        "skip_step": False,
    }

    def setup(self, ctx: MethodContext) -> None:
        super().setup(ctx)
        if not self.schedule.regrows:
            raise ValueError(f"snfs regrows on a periodic schedule, not on a {self.schedule.kind!r} one")
        self.m: dict[str, torch.Tensor] = {
            n: torch.zeros(v.local_numel, dtype=torch.float32, device=v.weight().device) for n, v in ctx.views.items()
        }
        self._bytes = ctx.state_bytes(4)

    @torch.no_grad()
    def observe(self, ctx: MethodContext, step: int) -> None:
        super().observe(ctx, step)
        if self.recipe.sparsity == 0.0 or not ctx.grads_finite(step, "snfs"):
            return
        beta = float(self.config.momentum)
        for n, v in ctx.views.items():
            self.m[n].mul_(beta).add_(v.grad().detach().float().to(self.m[n].device))

    def drop_counts(self, ctx: MethodContext, step: int, n_active: dict[str, int]) -> tuple[float, dict[str, int]]:
        """The schedule's fraction and ``ceil(p * n_active)`` per layer (the reference rounds up)."""
        frac = self.schedule.drop(step, ctx.total_steps)
        return frac, {n: math.ceil(frac * c) for n, c in n_active.items()}

    def grow_scores(self, view: ShardView, ctx: MethodContext, step: int) -> torch.Tensor:
        return self.m[view.name].abs()

    def grow_counts(self, ctx: MethodContext, step: int, n_active: dict[str, int], n_drop: dict[str, int],
                    survivors: dict[str, torch.Tensor]) -> dict[str, int]:
        if self.config.redistribution == "none":
            return n_drop
        names = list(ctx.views)
        active = ctx.active_masks(self.init_state)
        local_max = torch.tensor([float(self.m[n].abs()[active[n]].max()) if bool(active[n].any()) else 0.0
                                  for n in names], dtype=torch.float32)
        top = ctx.coll.all_reduce_max(local_max).tolist()
        fixed = torch.tensor([
            int(torch.floor(self.m[n].abs()[active[n]].double() / top[i] * _FIXED).sum()) if top[i] > 0 else 0
            for i, n in enumerate(names)
        ], dtype=torch.int64)
        sums = ctx.coll.all_reduce_sum(fixed).tolist()
        means = [s * top[i] / _FIXED / n_active[n] if n_active[n] else 0.0 for i, (n, s) in enumerate(zip(names, sums))]
        if sum(means) <= 0.0:
            return n_drop  # no momentum yet: each layer regrows what it removed
        shares = [x / sum(means) for x in means]
        caps = [int(self.config.max_fill * (ctx.views[n].numel - n_active[n] + n_drop[n])) for n in names]
        return dict(zip(names, redistribute(shares, sum(n_drop.values()), caps)))

    def metrics(self) -> dict[str, float]:
        total, largest = getattr(self, "_bytes", (0, 0))
        return {"dimred/snfs/momentum_bytes": float(total), "dimred/snfs/momentum_bytes_max": float(largest)}

    # ---- persistence ---------------------------------------------------------------------
    def tensor_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """``momentum`` over each view's local range (fp32); it reshards like the masks."""
        return {**super().tensor_state(), "momentum": dict(self.m)}

    def load_tensor_state(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        tensors = dict(tensors)
        if "momentum" not in tensors:
            raise ValueError(f"snfs: the checkpoint's method tensors are {sorted(tensors)}, expected momentum")
        for n, t in tensors.pop("momentum").items():
            self.m[n].copy_(t.float().to(self.m[n].device))
        super().load_tensor_state(tensors)
