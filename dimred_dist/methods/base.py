"""The lifecycle every method shares, and the hooks a method overrides.

A method is a policy: at chosen steps it scores the entries it can see (through shard views) and
moves entries between TRAIN, FREEZE and PRUNE. The manager alone sequences the hooks, each a no-op
unless a method or its schedule needs it::

    probe -> initialize -> per optimizer step: observe -> update -> (optimizer step) -> after_step

* :meth:`Method.probe`: scoring passes outside a training step (SNIP, GraSP, SynFlow, FORCE), with
  a :class:`~dimred_dist.distributed.probe.Prober` that runs forward / backward on the probe data;
* :meth:`Method.initialize`: the initial topology at the schedule's initial density;
* :meth:`Method.observe`: every step, with the rank's dense reduced gradients before masking;
* :meth:`Method.update`: a topology change, returning metrics, or ``None`` for no change;
* :meth:`Method.after_step`: after the optimizer wrote the fp32 masters, before they are copied
  into the module weights (weight rewinding).

*Which* entries a method keeps is its scores (:meth:`Method.scores`, :meth:`Method.init_scores`,
:meth:`Method.grow_scores`); *when* the topology changes and to what density is the recipe's
schedule (:mod:`dimred_dist.core.schedules`), so any score runs with any schedule. Selection is
exact and identical on every rank and world size (:mod:`dimred_dist.distributed.topk`); random
scores come from :mod:`dimred_dist.core.rng`.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch

from dimred_dist.core.config import MethodConfig, Recipe
from dimred_dist.core.rng import random_uint32
from dimred_dist.core.state import ElementState
from dimred_dist.methods.context import MethodContext
from dimred_dist.methods.rewind import Rewinding

__all__ = ["Method", "MethodContext"]

ScoreFn = Callable[[Any, MethodContext], torch.Tensor]


class Method:
    """Base lifecycle. A subclass defines :meth:`scores` and overrides the hooks where it differs."""

    method_name: ClassVar[str] = "base"
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    #: What entries become when they leave the active set (PRUNE for pruning methods, FREEZE for freezing).
    init_state: ClassVar[ElementState] = ElementState.PRUNE
    #: The schedule of a recipe that names none (a recipe mapping with ``kind``).
    default_schedule: ClassVar[dict[str, Any]] = {"kind": "one_shot"}
    #: True if :meth:`probe` needs data batches (not only a synthetic input).
    needs_data: ClassVar[bool] = False
    #: True for sparse fine-tuning of a pretrained model (its frozen entries mean pretrained values): the
    #: job refuses a model built at random from a config.
    needs_pretrained: ClassVar[bool] = False

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.config = recipe.args
        self.schedule = recipe.schedule
        self.rewinding = Rewinding(self.schedule) if self.schedule.kind == "imp" else None

    @property
    def dynamic(self) -> bool:
        """True if the topology can change during training (the manager then tracks the ITOP rate)."""
        return self.schedule.changes_topology

    @property
    def needs_probe(self) -> bool:
        """Whether :meth:`probe` must run before :meth:`initialize` (a fresh, not a resumed, run)."""
        return type(self).probe is not Method.probe and self.schedule.initial_density(self.recipe.density) < 1.0

    @property
    def probe_batches(self) -> int:
        """How many probe batches :meth:`probe` uses (the integrations draw as many)."""
        return int(getattr(self.config, "batches", 1))

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        """Checks that need the recipe's values together with the method's args, when the recipe is
        read (before any model is built); raise ``ValueError`` naming the values."""

    # ---- score hooks ---------------------------------------------------------------------
    def scores(self, view, ctx: MethodContext) -> torch.Tensor:
        """The criterion: active entries with the highest scores survive a pruning or drop step."""
        raise NotImplementedError(f"{type(self).__name__} must define scores()")

    def init_scores(self, view, ctx: MethodContext) -> torch.Tensor:
        """Scores of the initial topology (default: :meth:`scores`)."""
        return self.scores(view, ctx)

    def grow_scores(self, view, ctx: MethodContext, step: int) -> torch.Tensor:
        """Inactive entries with the highest scores are regrown (default: uniformly at random, SET)."""
        return random_uint32(self.recipe.seed, step, view.name, view.start, view.end, salt=1)

    def grow_counts(self, ctx: MethodContext, step: int, n_active: dict[str, int], n_drop: dict[str, int],
                    survivors: dict[str, torch.Tensor]) -> dict[str, int]:
        """How many entries each layer regrows in a :meth:`rewire` (default: as many as it dropped; SNFS
        redistributes the total across layers)."""
        return n_drop

    def grow_candidates(self, view, ctx: MethodContext, step: int) -> torch.Tensor | None:
        """Local mask limiting which non-surviving entries a :meth:`rewire` may regrow (None: any of them;
        SpIEL: only the candidates whose gradients it accumulated)."""
        return None

    # ---- lifecycle hooks -----------------------------------------------------------------
    def setup(self, ctx: MethodContext) -> None:
        """Once, before anything else, in fresh and resumed runs alike: check the schedule against the
        planned steps (a resumed run then loads its state instead of probing and initializing)."""
        self.schedule.check(ctx.total_steps, self.recipe.density)

    def require_no_schedule(self, message: str) -> None:
        """Raise ``ValueError(message)`` unless the schedule is the default ``one_shot`` at step 0 (methods
        that choose their own step, or choose once before training)."""
        if self.schedule.kind != "one_shot" or self.schedule.at_step != 0:
            raise ValueError(message)

    def probe(self, ctx: MethodContext, prober) -> None:
        """Scoring passes before training (no optimizer step); the default needs none."""

    def initialize(self, ctx: MethodContext) -> None:
        """Select the initial active entries at the schedule's initial density."""
        density = self.schedule.initial_density(self.recipe.density)
        if self.recipe.sparsity == 0.0 or density >= 1.0:
            return
        scores = {name: self.init_scores(v, ctx) for name, v in ctx.views.items()}
        ctx.apply(ctx.select(scores, ctx.budgets(density)), self.init_state)

    def observe(self, ctx: MethodContext, step: int) -> None:
        """Every step, before the update, with the dense reduced gradients (rewinding snapshots here)."""
        if self.rewinding is not None:
            self.rewinding.observe(ctx, step)

    def may_update(self, ctx: MethodContext, step: int) -> bool:
        """Whether :meth:`update` could change the topology before ``step`` (for the count of updates skipped
        on non-finite gradients). A method that overrides :meth:`update` is taken to update on any step."""
        if type(self).update is not Method.update:
            return True
        return self.recipe.sparsity != 0.0 and self.schedule.is_update_step(step, ctx.total_steps)

    def update(self, ctx: MethodContext, step: int) -> dict[str, float] | None:
        """The schedule's topology change before step ``step``: metrics, or None if nothing changed."""
        if self.recipe.sparsity == 0.0 or not self.schedule.is_update_step(step, ctx.total_steps):
            return None
        if self.schedule.regrows:
            out = self.rewire(ctx, step)
            if out is not None and self.schedule.skip_step:
                ctx.skip_step()
            return out
        density = self.schedule.density(step, ctx.total_steps, self.recipe.density)
        out = self.prune_to(ctx, density)
        if self.rewinding is not None:
            self.rewinding.round_end(ctx, step)
            out = {**(out or {}), "dimred/round": float(self.schedule.round_of_update(step, ctx.total_steps))}
        return out

    def after_step(self, ctx: MethodContext, step: int) -> bool:
        """After the optimizer wrote the masters of :meth:`MethodContext.written_views` (weight rewinding
        here); returns True if the method wrote weights itself (pruned entries must stay 0)."""
        if self.rewinding is not None:
            return self.rewinding.after_step(ctx, step)
        return False

    # ---- the two kinds of update ---------------------------------------------------------
    @torch.no_grad()
    def prune_to(self, ctx: MethodContext, density: float) -> dict[str, float] | None:
        """Remove the lowest-scoring active entries until the layer budgets of ``density`` hold."""
        target, old = ctx.budgets(density), ctx.active_masks(self.init_state)
        n_active = ctx.global_count(old)
        if ctx.global_budget:
            if sum(target.values()) >= sum(n_active.values()):
                return None
            counts = target
        else:
            counts = {n: min(target[n], n_active[n]) for n in ctx.views}
            if counts == n_active:
                return None
        keep = ctx.select({n: self.scores(v, ctx) for n, v in ctx.views.items()}, counts, eligible=old)
        ctx.apply(keep, self.init_state)
        return {"dimred/churn": ctx.churn(old, keep), "dimred/target_density": float(density)}

    def drop_counts(self, ctx: MethodContext, step: int, n_active: dict[str, int]) -> tuple[float, dict[str, int]]:
        """The drop fraction of the update before ``step`` and each layer's drop count: the schedule's
        fraction, ``int(fraction * n_active)`` (truncated, as in RigL's code)."""
        frac = self.schedule.drop(step, ctx.total_steps)
        return frac, {n: int(frac * c) for n, c in n_active.items()}

    @torch.no_grad()
    def rewire(self, ctx: MethodContext, step: int) -> dict[str, float] | None:
        """Drop :meth:`drop_counts` of each layer's active entries with the lowest :meth:`scores`
        (``int(drop_fraction * n_active)``), regrow :meth:`grow_counts` (as many) of the other entries
        with the highest :meth:`grow_scores`.

        As in RigL's code, an entry dropped in this update competes for regrowth and, if regrown,
        is not a new connection: it keeps its value and moments. A new connection (inactive before)
        starts at 0 when pruning (at its frozen value when freezing) with zero optimizer moments.
        """
        old = ctx.active_masks(self.init_state)
        n_active = ctx.global_count(old)
        frac, n_drop = self.drop_counts(ctx, step, n_active)
        if not any(n_drop.values()):
            return None
        survivors = ctx.select(
            {n: self.scores(v, ctx) for n, v in ctx.views.items()},
            {n: n_active[n] - n_drop[n] for n in ctx.views},
            eligible=old,
        )
        eligible = {n: ~m for n, m in survivors.items()}
        for n, v in ctx.views.items():
            cand = self.grow_candidates(v, ctx, step)
            if cand is not None:
                eligible[n] &= cand
        n_grow = self.grow_counts(ctx, step, n_active, n_drop, survivors)
        grown = ctx.select({n: self.grow_scores(v, ctx, step) for n, v in ctx.views.items()}, n_grow, eligible=eligible)
        new = {n: survivors[n] | grown[n] for n in ctx.views}
        fresh = {n: grown[n] & ~old[n] for n in ctx.views}
        if self.init_state is ElementState.PRUNE:
            for name, v in ctx.views.items():
                v.weight().masked_fill_(fresh[name], 0.0)
        ctx.apply(new, self.init_state)
        ctx.reset_moments(fresh)
        return {"dimred/churn": ctx.churn(old, new), "dimred/drop_fraction": frac}

    def metrics(self) -> dict[str, float]:
        """The method's own flat metrics (``dimred/...``, the same on every rank), merged into the manager's."""
        return {}

    # ---- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain-data state of the method (JSON); the schedule needs only the manager's step."""
        return {} if self.rewinding is None else {"rewinding": self.rewinding.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        extra = sorted(set(sd) - ({"rewinding"} if self.rewinding is not None else set()))
        if extra:
            raise ValueError(f"{type(self).__name__} keeps no state {extra}")
        if self.rewinding is not None and "rewinding" in sd:
            self.rewinding.load_state_dict(sd["rewinding"])

    def tensor_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors over views' local ranges, ``{key: {parameter name: local 1-D tensor}}``.

        Checkpoints store them by global range next to the masks, so they reshard on a change of
        world size or ZeRO stage. The parameter may be any trainable one (its view comes from
        :meth:`MethodContext.trainable_views`).
        """
        return {} if self.rewinding is None else self.rewinding.tensor_state()

    def load_tensor_state(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore what :meth:`tensor_state` returned (already cut to this rank's ranges)."""
        if self.rewinding is not None:
            self.rewinding.load_tensor_state(tensors)
        elif tensors:
            raise ValueError(f"{type(self).__name__} keeps no tensor state but got {sorted(tensors)}")
