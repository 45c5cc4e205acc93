"""The framework-agnostic engine: a method, the element state, the schedule and a shard adapter.

Typical plain PyTorch / DDP use::

    manager = DimRedManager(recipe, model, total_steps=1000).prepare()
    manager.attach(optimizer)          # masks gradients before, enforces weights after each step
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

Under DeepSpeed a ZeRO adapter calls :meth:`DimRedManager.before_optimizer_step` and
:meth:`DimRedManager.after_optimizer_step` from inside the engine's step instead.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

from dimred_dist.core.config import Recipe
from dimred_dist.core.distributions import keep_counts, layer_densities
from dimred_dist.core.logging import get_logger
from dimred_dist.core.registry import get_method
from dimred_dist.core.state import DimRedState, ParamState
from dimred_dist.core.targets import select_parameters
from dimred_dist.distributed.adapter import ReplicatedAdapter
from dimred_dist.methods.base import Method, MethodContext
from dimred_dist.metrics import EverActive, compute_metrics
from dimred_dist.optim.compact import CompactOptimizer

logger = get_logger(__name__)


class DimRedManager:
    """Applies a recipe to a model during training.

    Args:
        recipe: The validated recipe.
        model: The model whose parameters are managed (the module, not a DDP/engine wrapper).
        adapter: How parameters are distributed; default: single process or DDP, detected.
        total_steps: Planned number of optimizer steps (schedules of dynamic methods need it).
    """

    def __init__(self, recipe: Recipe, model: nn.Module, *, adapter=None, total_steps: int = 0) -> None:
        if total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {total_steps}")
        self.recipe = recipe
        self.model = model
        self.adapter = adapter or ReplicatedAdapter()
        self.total_steps = total_steps
        self.method: Method = get_method(recipe.method)(recipe)
        self.step = 0
        self.params = {n: p for n, p in select_parameters(model, recipe.targets).items() if p.requires_grad}
        if not self.params:
            raise ValueError("every parameter matched by the targets has requires_grad=False: nothing to manage")
        self.ctx: MethodContext | None = None
        self._frozen: dict[str, torch.Tensor] = {}
        self.optimizer = None
        self.update_seconds = 0.0
        #: One record per topology update: ``step`` (0-based optimizer step it ran before), ``seconds``
        #: and the method's metrics without the ``dimred/`` prefix (``churn``, ``drop_fraction``).
        self.topology_history: list[dict[str, float]] = []
        self._ever: EverActive | None = None
        self._synced_epoch = -1

    # ---- set-up --------------------------------------------------------------------------
    def prepare(self, *, resuming: bool = False) -> DimRedManager:
        """Build views and state, choose the initial topology and apply it to the weights.

        ``resuming=True`` leaves the weights alone: the method still sets up its schedules (and picks a
        throwaway initial topology), and :func:`dimred_dist.distributed.checkpoint.load_dimred_state`
        sets the saved topology next (masking trained weights with a fresh topology would destroy them).
        """
        views = self.adapter.views(self.params)
        state = DimRedState({n: ParamState.dense(n, v.shape, v.start, v.end) for n, v in views.items()})
        shapes = {n: v.shape for n, v in views.items()}
        densities = layer_densities(self.recipe.distribution, shapes, self.recipe.density)
        self.ctx = MethodContext(
            views=views,
            state=state,
            coll=self.adapter.collectives,
            keep_counts=keep_counts(densities, shapes),
            global_budget=self.recipe.distribution == "global",
            total_steps=self.total_steps,
        )
        t0 = time.perf_counter()
        self.method.initialize(self.ctx)
        self.update_seconds += time.perf_counter() - t0
        if not resuming:
            self.apply_masks()
        self._ever = EverActive(self.ctx.state) if self.method.dynamic else None
        logger.info(
            "dimred: %s at sparsity %.3f (%s) on %d parameters", self.recipe.method, self.recipe.sparsity,
            self.recipe.distribution, len(views),
        )
        return self

    @property
    def state(self) -> DimRedState:
        self._require_prepared()
        return self.ctx.state

    @property
    def views(self):
        self._require_prepared()
        return self.ctx.views

    def _require_prepared(self) -> None:
        if self.ctx is None:
            raise RuntimeError("DimRedManager.prepare() has not been called")

    # ---- the step ------------------------------------------------------------------------
    def before_optimizer_step(self) -> None:
        """Run a due topology update on the current gradients, then zero non-TRAIN gradients."""
        self._require_prepared()
        if self.method.is_update_step(self.step):
            t0 = time.perf_counter()
            result = self.method.update(self.ctx, self.step)
            seconds = time.perf_counter() - t0
            self.update_seconds += seconds
            record = {k.removeprefix("dimred/"): float(v) for k, v in result.items()}
            self.topology_history.append({"step": float(self.step), "seconds": seconds, **record})
            if self._ever is not None:
                self._ever.update(self.ctx.state)
            self.apply_masks(propagate=False)
            self.sync_optimizer()
        elif isinstance(self.optimizer, CompactOptimizer) and not self._optimizer_in_sync():
            self.sync_optimizer()  # its state was loaded from elsewhere: the manager's masks rule
        self.mask_gradients()

    def after_optimizer_step(self) -> None:
        """Keep PRUNE entries at 0 and FREEZE entries at their frozen value; count the step."""
        self._require_prepared()
        self.enforce_weights()
        self.count_step()

    def count_step(self) -> None:
        self.step += 1

    def mask_gradients(self) -> None:
        """Zero the gradients of entries that are not TRAIN (exact zeros, even where one is inf or NaN)."""
        for name, v in self.ctx.views.items():
            g = v.grad()
            if g is not None:
                torch.where(self.ctx.state[name].train, g, g.new_zeros(()), out=g)

    @torch.no_grad()
    def apply_masks(self, *, propagate: bool = True) -> None:
        """Zero pruned entries and remember the values of frozen entries (after a topology change).

        ``propagate`` copies the edited masters into every weight copy the framework keeps; inside
        an optimizer step that copy happens anyway.
        """
        for name, v in self.ctx.views.items():
            v.weight().masked_fill_(~self.ctx.state[name].keep, 0.0)
        self._capture_frozen()
        if propagate:
            self.adapter.weights_edited()

    @torch.no_grad()
    def _capture_frozen(self) -> None:
        """Copy the values of FREEZE entries, which :meth:`enforce_weights` restores after a step.

        Not with a compact optimizer: it never writes an entry that is not TRAIN, so the copy (4 bytes
        per frozen entry and rank, half of the Adam state that freezing gives back) is not needed.
        """
        self._frozen.clear()
        if isinstance(self.optimizer, CompactOptimizer):
            return
        for name, v in self.ctx.views.items():
            freeze = self.ctx.state[name].freeze_mask()
            if bool(freeze.any()):
                self._frozen[name] = v.weight()[freeze].clone()

    @torch.no_grad()
    def enforce_weights(self, flats: set[int] | None = None) -> None:
        """Zero PRUNE and restore FREEZE entries (only of views on the flat tensors ``flats``, if given).

        Nothing to do after the step of a compact optimizer that holds the current masks: it writes
        TRAIN entries only, so PRUNE entries stay 0 and FREEZE entries keep their value.
        """
        if self._optimizer_in_sync():
            return
        for name, v in self.ctx.views.items():
            if flats is not None and id(getattr(v, "flat", None)) not in flats:
                continue
            ps = self.ctx.state[name]
            w = v.weight()
            w.masked_fill_(~ps.keep, 0.0)
            if name in self._frozen:
                w[ps.freeze_mask()] = self._frozen[name]

    def sync_optimizer(self) -> None:
        """Give a compact optimizer the current TRAIN masks (regrown entries restart their moments)."""
        if isinstance(self.optimizer, CompactOptimizer):
            self.adapter.sync_optimizer(self.optimizer, self.ctx.views, self.ctx.state, self.ctx.regrown)
            self._synced_epoch = self.optimizer.mask_epoch
        self.ctx.regrown.clear()

    def _optimizer_in_sync(self) -> bool:
        """Whether the optimizer is compact and its masks are the ones this manager last gave it."""
        return isinstance(self.optimizer, CompactOptimizer) and self.optimizer.mask_epoch == self._synced_epoch

    def attach(self, optimizer: Any, *, pre_step: bool = True) -> DimRedManager:
        """Run the manager around every optimizer step.

        * plain PyTorch / DDP: ``optimizer`` is the torch optimizer; gradients are masked in a step
          pre-hook and weights enforced in a post-hook. If you clip gradients, the norm must see
          masked gradients: pass ``pre_step=False`` and call :meth:`before_optimizer_step` yourself
          between ``backward()`` and the clipping.
        * DeepSpeed ZeRO: ``optimizer`` is the engine (or its optimizer); the adapter hooks the
          ZeRO step itself (before the norm, and after the client optimizer's update).

        A :class:`~dimred_dist.optim.CompactOptimizer` gets the TRAIN masks now and after every
        topology change, so it keeps state for TRAIN entries only.
        """
        self._require_prepared()
        self.optimizer = self.adapter.install(self, optimizer, pre_step=pre_step)
        self.sync_optimizer()
        self._capture_frozen()
        return self

    def detach(self) -> None:
        """Remove the step hooks installed by :meth:`attach`."""
        self.adapter.uninstall()
        self.optimizer = None

    # ---- observation ---------------------------------------------------------------------
    def global_counts(self) -> dict[str, torch.Tensor]:
        """Per layer: global (train, freeze, prune) counts (one small all-reduce where sharded)."""
        names = list(self.ctx.views)
        rows = []
        for n in names:
            c = self.ctx.state[n].counts()
            rows.append([c[k] for k in sorted(c)])
        total = self.ctx.coll.all_reduce_sum(torch.tensor(rows, dtype=torch.int64).reshape(len(names), 3))
        return {n: total[i] for i, n in enumerate(names)}

    def metrics(self) -> dict[str, float]:
        """Flat metrics dict (keys in :mod:`dimred_dist.metrics`), with one small all-reduce.

        ``density`` counts entries that are not pruned (TRAIN and FREEZE); ``train_fraction`` counts
        TRAIN entries only, so a freezing method shows density 1 and a small train fraction. Churn is
        reported with ``dimred/last_update_step``, the step of the update it belongs to. Every rank
        must call it (it holds a collective); all ranks get the same values except the timing.
        """
        self._require_prepared()
        return compute_metrics(
            self.ctx.state, list(self.ctx.views), self.ctx.coll, ever=self._ever, optimizer=self.optimizer,
            update_seconds=self.update_seconds, history=self.topology_history,
        )

    def check_agreement(self) -> None:
        """Raise if replicated parameters' topologies differ between ranks (one small all-reduce)."""
        names = [n for n, v in self.ctx.views.items() if v.replicated]
        if not names:
            return
        coll = self.adapter.check_collectives
        sums = torch.tensor([_checksum(self.ctx.state[n].codes()) for n in names], dtype=torch.int64)
        hi = coll.all_reduce_max(sums)
        lo = -coll.all_reduce_max(-sums)
        bad = [n for n, a, b in zip(names, hi.tolist(), lo.tolist()) if a != b]
        if bad:
            raise RuntimeError(f"ranks disagree on the topology of {bad[:5]} at step {self.step}")

    # ---- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "masks": self.state.state_dict(), "method": self.method.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.state.load_state_dict(sd["masks"])
        self.method.load_state_dict(sd.get("method", {}))
        self.step = int(sd["step"])
        self.apply_masks()
        if self._ever is not None:  # a checkpoint holds no ITOP history: count from the loaded topology
            self._ever = EverActive(self.state)
        if self.optimizer is not None:
            self.sync_optimizer()


def _checksum(codes: torch.Tensor) -> int:
    idx = torch.arange(1, codes.numel() + 1, dtype=torch.int64)
    return int(((codes.to(torch.int64) + 1) * ((idx * 2654435761) % 2147483647)).sum() % (1 << 61))
