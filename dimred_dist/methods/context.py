"""What a method sees and the few things it may ask for: :class:`MethodContext`.

A method never touches an optimizer, an engine or a process group: it reads views and state, selects
with the exact distributed top-k, and asks the context for what the manager then carries out
(moment resets, an optimizer restart, a skipped optimizer step, an LR schedule snapshot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from dimred_dist.core.distributions import keep_counts, layer_densities
from dimred_dist.core.state import DimRedState, ElementState
from dimred_dist.distributed.collectives import Collectives
from dimred_dist.distributed.topk import Segment, exact_topk_masks
from dimred_dist.distributed.views import ShardView


@dataclass
class MethodContext:
    """Everything a method may look at and ask for.

    Attributes:
        views: Shard view per managed parameter, in model order.
        state: The TRAIN / FREEZE / PRUNE state over each view's local range.
        coll: Collectives over the ranks that share the parameters.
        keep_counts: Entries kept (not pruned / not frozen) per layer at the recipe's density.
        global_budget: If True, one top-k across all layers decides instead of per-layer counts.
        total_steps: Length of training in optimizer steps (for schedules).
        distribution: The recipe's layer-wise distribution (``uniform``, ``erk``, ``global``).
        moment_resets: Local masks of entries whose optimizer moments restart at zero (regrown
            entries); filled through :meth:`reset_moments`, carried out and cleared by the manager.
        restart_requested: Set by :meth:`restart_optimizer`; carried out by the manager.
        skip_requested: Set by :meth:`skip_step`; the optimizer does not apply this step.
        lr_requests: ``("save", key)`` / ``("restore", key)`` requests on the LR schedule, carried out
            by the manager (through the scheduler it was given) before this step's optimizer update.
        trainable_views_fn: Builds views of every trainable parameter (managed or not), on demand.
    """

    views: dict[str, ShardView]
    state: DimRedState
    coll: Collectives
    keep_counts: dict[str, int]
    global_budget: bool
    total_steps: int
    distribution: str = "uniform"
    moment_resets: dict[str, torch.Tensor] = field(default_factory=dict)
    restart_requested: bool = False
    skip_requested: bool = False
    lr_requests: list[tuple[str, str]] = field(default_factory=list)
    trainable_views_fn: Callable[[], dict[str, ShardView]] | None = None
    _trainable: dict[str, ShardView] | None = field(default=None, repr=False)
    #: Set by the manager around :meth:`Method.after_step`: ids of the flat tensors just stepped (None: all).
    written_flats: set[int] | None = field(default=None, repr=False)

    # ---- budgets and selection -----------------------------------------------------------
    def budgets(self, density: float) -> dict[str, int]:
        """Per-layer keep counts at ``density`` with the recipe's distribution (exact integers, the
        same on every rank); at the recipe's density these are :attr:`keep_counts`."""
        shapes = {n: v.shape for n, v in self.views.items()}
        if density >= 1.0:
            return {n: math.prod(s) for n, s in shapes.items()}
        return keep_counts(layer_densities(self.distribution, shapes, density), shapes)

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

    def churn(self, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> float:
        """Fraction of the managed entries whose mask differs between ``old`` and ``new`` (one all-reduce)."""
        changed = torch.tensor([sum(int((old[n] ^ new[n]).sum()) for n in self.views)], dtype=torch.int64)
        total = sum(v.numel for v in self.views.values())
        return int(self.coll.all_reduce_sum(changed)) / max(total, 1)

    def state_bytes(self, per_entry: int) -> tuple[int, int]:
        """Bytes of method state holding ``per_entry`` bytes for every managed entry a rank holds: summed
        over the ranks, and on the largest rank (two small all-reduces; for the method's metrics)."""
        local = torch.tensor([per_entry * sum(v.local_numel for v in self.views.values())], dtype=torch.int64)
        return int(self.coll.all_reduce_sum(local.clone())[0]), int(self.coll.all_reduce_max(local)[0])

    def grads_finite(self, step: int, who: str) -> bool:
        """Whether every rank's gradients of the managed views are finite (one small all-reduce, so all
        ranks agree): a method that accumulates gradients skips a step DeepSpeed skips (fp16 overflow)."""
        bad = 0
        for n, v in self.views.items():
            g = v.grad()
            if g is None:
                raise RuntimeError(f"{who} needs the gradient of {n} at step {step}, but it has none")
            bad += int((~torch.isfinite(g)).any())
        return int(self.coll.all_reduce_sum(torch.tensor([bad], dtype=torch.int64))[0]) == 0

    # ---- the topology --------------------------------------------------------------------
    def active_masks(self, inactive: ElementState) -> dict[str, torch.Tensor]:
        """Copies of the masks a method moves entries out of: ``keep`` when entries leave to PRUNE,
        ``train`` when they leave to FREEZE."""
        key = "keep" if inactive is ElementState.PRUNE else "train"
        return {n: getattr(self.state[n], key).clone() for n in self.views}

    def apply(self, selected: dict[str, torch.Tensor], inactive: ElementState) -> None:
        """Make ``selected`` the active entries; the others become ``inactive`` (PRUNE or FREEZE).

        PRUNE: ``selected`` is the keep mask (newly kept entries TRAIN). FREEZE: ``selected`` is the
        train mask (nothing is pruned or un-pruned). The manager zeroes pruned weights afterwards.
        """
        if inactive not in (ElementState.PRUNE, ElementState.FREEZE):
            raise ValueError(f"entries can leave to PRUNE or FREEZE, not {inactive!r}")
        for name, mask in selected.items():
            if inactive is ElementState.PRUNE:
                self.state[name].set_keep(mask)
            else:
                self.state[name].set_train(mask)

    # ---- requests carried out by the manager ----------------------------------------------
    def reset_moments(self, masks: dict[str, torch.Tensor]) -> None:
        """Restart the optimizer moments of these local entries at zero (added to earlier requests)."""
        for name, m in masks.items():
            prev = self.moment_resets.get(name)
            self.moment_resets[name] = m.clone() if prev is None else prev | m

    def restart_optimizer(self) -> None:
        """Restart the optimizer at this step: every moment and step count from zero (IMP rounds)."""
        self.restart_requested = True

    def skip_step(self) -> None:
        """Do not apply this step's optimizer update (its gradient served a topology update)."""
        self.skip_requested = True

    def save_lr_schedule(self, key: str) -> None:
        """Remember the LR schedule as it is now, before this step's update, under ``key``."""
        self.lr_requests.append(("save", key))

    def restore_lr_schedule(self, key: str) -> None:
        """Return the LR schedule to what :meth:`save_lr_schedule` remembered under ``key``, before this
        step's update (so this step uses that learning rate)."""
        self.lr_requests.append(("restore", key))

    def trainable_views(self) -> dict[str, ShardView]:
        """Views of every trainable parameter, managed or not, in model order (for state that covers
        the whole model, such as a rewinding snapshot); the managed ones are :attr:`views` themselves."""
        if self._trainable is None:
            self._trainable = self.trainable_views_fn() if self.trainable_views_fn is not None else dict(self.views)
        return self._trainable

    def written_views(self) -> dict[str, ShardView]:
        """In :meth:`Method.after_step`: the trainable views whose masters the optimizer just wrote
        (ZeRO steps its flat partitions one at a time, and copies each into the module weights next)."""
        views = self.trainable_views()
        if self.written_flats is None:
            return views
        return {n: v for n, v in views.items() if id(getattr(v, "flat", None)) in self.written_flats}

    def view_of(self, name: str) -> ShardView:
        """The view of any trainable parameter by name."""
        if name in self.views:
            return self.views[name]
        views = self.trainable_views()
        if name not in views:
            raise KeyError(f"no trainable parameter named {name!r}")
        return views[name]

    def take_requests(self) -> dict[str, Any]:
        """The pending requests, cleared (the manager's side)."""
        out = {"moment_resets": self.moment_resets, "restart": self.restart_requested, "skip": self.skip_requested,
               "lr": self.lr_requests}
        self.moment_resets, self.restart_requested, self.skip_requested, self.lr_requests = {}, False, False, []
        return out
