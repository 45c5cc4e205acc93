"""Progressive layer freezing: Brock et al., 2017, "FreezeOut: Accelerate Training by Progressively
Freezing Layers", its schedule (ajbrock/FreezeOut: ``lr_ratio = scale_fn(t_0 + (1 - t_0) * c / L)``).

Whole layers move from TRAIN to FREEZE during training, the first layer first. With ``G`` layer groups
that freeze, group ``i`` (0-based) freezes before step ``floor(T * scale(t0 + (1 - t0) * i / G))`` of
``T`` planned steps, ``scale`` being ``linear`` (x), ``squared`` (x**2) or ``cubic`` (x**3); whatever is
managed and in no group (with ``groups: auto``, the last group: the head) trains to the end, as
FreezeOut's last layer.

``groups: auto`` forms the groups from the managed parameters' names in model order: the name up to
its first numeric component (``bert.encoder.layer.3``) is one group; parameters before the first
numbered one (embeddings) form the first group, those after the last numbered one the final group.
A list of regular expressions (searched in the names) gives the groups in freezing order instead; a
parameter in two groups belongs to the first. Manage every parameter of a layer (``targets: {biases:
true, norms: true}``) to freeze all of it.

A layer frozen mid-run keeps its value bit for bit, and the compact optimizer gives its state back at
once (the update's ``dimred/optimizer/released_bytes``, summed over ranks; ``rank_released_bytes`` on
the rank that released most). Backward work is not saved: DeepSpeed fixes the trainable set when the
engine is built, so a frozen layer's gradients are still computed and reduced (then zeroed); what is
saved is the optimizer state and the optimizer's arithmetic over the frozen entries.

Where this differs from FreezeOut: its per-layer learning rates are annealed by a cosine to zero at
each layer's freeze point (and scaled up by ``1 / t_i``); here the optimizer's learning rate schedule
is the user's, the same for every layer, and a layer stops training at its point.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from dimred_dist.core.config import MethodConfig
from dimred_dist.core.registry import register_method
from dimred_dist.core.state import ElementState
from dimred_dist.methods.base import Method, MethodContext

_SCALES = {"linear": lambda x: x, "squared": lambda x: x**2, "cubic": lambda x: x**3}
_NUMBERED = re.compile(r"^(.*?\.\d+)(\.|$)")


@dataclass(kw_only=True)
class FreezeOutConfig(MethodConfig):
    """Attributes:
        groups: ``auto``, or regular expressions naming the layer groups in freezing order.
        t0: Fraction of training (before scaling) at which the first group freezes.
        scale: ``linear``, ``squared`` or ``cubic`` (FreezeOut's ``scale_fn``).
    """

    groups: Any = "auto"
    t0: float = 0.5
    scale: str = "cubic"

    def __post_init__(self) -> None:
        g = self.groups
        if g != "auto":
            if not isinstance(g, list) or not g or not all(isinstance(p, str) and p for p in g):
                raise ValueError(f"groups must be 'auto' or a non-empty list of regular expressions, got {g!r}")
            for p in g:
                try:
                    re.compile(p)
                except re.error as e:
                    raise ValueError(f"groups: invalid regular expression {p!r}: {e}") from None
        if isinstance(self.t0, bool) or not isinstance(self.t0, (int, float)) or not 0.0 < self.t0 < 1.0:
            raise ValueError(f"t0 must be in (0, 1), got {self.t0!r}")
        if self.scale not in _SCALES:
            raise ValueError(f"scale must be one of {sorted(_SCALES)}, got {self.scale!r}")


def auto_groups(names: list[str]) -> list[list[str]]:
    """Managed parameter names (model order) grouped by their prefix up to the first numeric component;
    names before the first numbered one form the first group, those after the last one the final."""
    keys = [(m.group(1) if (m := _NUMBERED.match(n)) else None) for n in names]
    numbered = [i for i, k in enumerate(keys) if k is not None]
    if not numbered:
        return [[n] for n in names]  # no numbered blocks: every parameter is a layer
    first, last = numbered[0], numbered[-1]
    groups: dict[str, list[str]] = {}
    for i, (n, k) in enumerate(zip(names, keys)):
        key = k if k is not None else ("<input>" if i < first else "<output>" if i > last else n)
        groups.setdefault(key, []).append(n)
    return list(groups.values())


@register_method("freezeout")
class FreezeOut(Method):
    config_cls = FreezeOutConfig
    init_state = ElementState.FREEZE

    def setup(self, ctx: MethodContext) -> None:
        super().setup(ctx)
        self.require_no_schedule("freezeout freezes layers on its own schedule (args t0, scale); give no `schedule`")
        if self.recipe.sparsity != 0.0:
            raise ValueError(f"freezeout freezes whole layers on its schedule; set sparsity: 0 (got "
                             f"{self.recipe.sparsity})")
        names = list(ctx.views)
        if self.config.groups == "auto":
            groups = auto_groups(names)[:-1]  # the last group trains to the end
            if not groups:
                raise ValueError(f"freezeout: groups auto found a single layer group in {names}; nothing would freeze")
        else:
            groups, taken = [], set()
            for i, p in enumerate(self.config.groups):
                members = [n for n in names if re.search(p, n) and n not in taken]
                if not members:
                    raise ValueError(f"freezeout: groups[{i}] {p!r} names no managed parameter (managed: "
                                     f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''})")
                taken.update(members)
                groups.append(members)
        self.groups: list[list[str]] = groups
        self.freeze_steps = [self.freeze_step(i, ctx.total_steps) for i in range(len(groups))]

    def freeze_step(self, i: int, total_steps: int) -> int:
        """The step before which group ``i`` freezes."""
        t = _SCALES[self.config.scale](self.config.t0 + (1.0 - self.config.t0) * i / len(self.groups))
        return int(math.floor(total_steps * t))

    @property
    def dynamic(self) -> bool:
        return False  # entries never return to TRAIN: no ITOP rate

    def initialize(self, ctx: MethodContext) -> None:
        self._freeze(ctx, 0)  # a group whose point is step 0 freezes at once

    def update(self, ctx: MethodContext, step: int) -> dict[str, float] | None:
        return self._freeze(ctx, step) if step > 0 else None

    @torch.no_grad()
    def _freeze(self, ctx: MethodContext, step: int) -> dict[str, float] | None:
        due = [i for i, s in enumerate(self.freeze_steps) if s == step]
        if not due:
            return None
        old = ctx.active_masks(self.init_state)
        new = dict(old)
        for i in due:
            for n in self.groups[i]:
                new[n] = torch.zeros_like(old[n])
        ctx.apply(new, self.init_state)
        frozen = sum(1 for s in self.freeze_steps if s <= step)
        return {"dimred/churn": ctx.churn(old, new), "dimred/frozen_groups": float(frozen)}

    def metrics(self) -> dict[str, float]:
        return {"dimred/freezeout/groups": float(len(getattr(self, "groups", [])))}
