"""The framework-agnostic engine: a method, the element state, the schedule and a shard adapter.

Typical plain PyTorch / DDP use::

    manager = DimRedManager(recipe, model, total_steps=1000).prepare()
    manager.attach(optimizer, lr_scheduler=scheduler)   # around every optimizer.step()
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

Under DeepSpeed a ZeRO adapter calls :meth:`DimRedManager.before_optimizer_step` and
:meth:`DimRedManager.after_optimizer_step` from inside the engine's step instead.

The manager alone sequences the method's hooks (see :mod:`dimred_dist.methods.base`): ``probe``
and ``initialize`` in :meth:`DimRedManager.prepare`; per optimizer step ``observe`` and ``update``
before it (then the gradients of entries that are not TRAIN are zeroed), ``after_step`` after it.
What a method asks of its :class:`~dimred_dist.methods.base.MethodContext` (moment resets, an
optimizer restart, a skipped step, an LR schedule snapshot) is carried out here.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import torch
import torch.nn as nn

from dimred_dist.core.config import Recipe
from dimred_dist.core.distributions import check_no_empty_layers, keep_counts, layer_densities
from dimred_dist.core.logging import get_logger
from dimred_dist.core.registry import get_method
from dimred_dist.core.state import DimRedState, ElementState, ParamState
from dimred_dist.core.targets import select_parameters
from dimred_dist.core.tensors import tensors_in
from dimred_dist.distributed.adapter import ReplicatedAdapter
from dimred_dist.distributed.probe import ProbeData, Prober
from dimred_dist.distributed.protocol import ShardAdapter
from dimred_dist.methods.base import Method, MethodContext
from dimred_dist.metrics import EverActive, compute_metrics
from dimred_dist.optim import surgery
from dimred_dist.optim.compact import CompactOptimizer

logger = get_logger(__name__)


class DimRedManager:
    """Applies a recipe to a model during training.

    Args:
        recipe: The validated recipe.
        model: The model whose parameters are managed (the module, not a DDP/engine wrapper).
        adapter: How parameters are distributed; default: single process or DDP, detected.
        total_steps: Planned number of optimizer steps (schedules need it).
    """

    def __init__(self, recipe: Recipe, model: nn.Module, *, adapter: ShardAdapter | None = None,
                 total_steps: int = 0) -> None:
        if total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {total_steps}")
        self.recipe = recipe
        self.model = model
        self.adapter: ShardAdapter = adapter or ReplicatedAdapter()
        self.total_steps = total_steps
        self.method: Method = get_method(recipe.method)(recipe)
        self.step = 0
        self.params = {n: p for n, p in select_parameters(model, recipe.targets).items() if p.requires_grad}
        if not self.params:
            raise ValueError("every parameter matched by the targets has requires_grad=False: nothing to manage")
        self.ctx: MethodContext | None = None
        self._frozen: dict[str, torch.Tensor] = {}
        self.optimizer = None
        self.lr_scheduler = None
        self.update_seconds = 0.0
        #: One record per topology update: ``step`` (0-based optimizer step it ran before), ``seconds``
        #: and the method's metrics without the ``dimred/`` prefix (``churn``, ``drop_fraction``, ...).
        self.topology_history: list[dict[str, float]] = []
        self._ever: EverActive | None = None
        self._synced_epoch = -1
        self._before_done = -1  # the step whose before_optimizer_step has run
        #: True between a topology update that asked for it and the end of that step: the optimizer
        #: does not apply the step (the adapters drop the gradients it would see).
        self.skipping = False
        self._lr_saved: dict[str, dict[str, Any]] = {}
        #: Steps with non-finite gradients: in a row up to the latest step, and in all; topology updates
        #: skipped because of them (the method neither observes nor updates such a step).
        self.nonfinite_streak = 0
        self.nonfinite_steps = 0
        self.skipped_updates = 0
        self._pending_moments: tuple[float, dict[str, dict[str, torch.Tensor]]] | None = None

    # ---- set-up --------------------------------------------------------------------------
    def prepare(self, *, resuming: bool = False, probe: ProbeData | None = None) -> DimRedManager:
        """Build views and state, run the method's scoring passes, choose the initial topology and apply it.

        Args:
            resuming: Leave the weights alone and choose no topology:
                :func:`dimred_dist.distributed.checkpoint.load_dimred_state` sets the saved one next
                (masking trained weights with a fresh topology would destroy them).
            probe: Batches and a loss for methods that score entries on data before training (SNIP,
                GraSP, FORCE, ...); the same on every rank. Methods that need none ignore it.

        Raises:
            ValueError: Before any weight changes, for a method that needs probe data and got none, or
                whose probe gives no gradient.
        """
        views = self.adapter.views(self.params)
        state = DimRedState({n: ParamState.dense(n, v.shape, v.start, v.end, device=v.weight().device)
                             for n, v in views.items()})
        shapes = {n: v.shape for n, v in views.items()}
        densities = layer_densities(self.recipe.distribution, shapes, self.recipe.density)
        counts = keep_counts(densities, shapes)
        check_no_empty_layers(counts, self.recipe.distribution, self.recipe.density,
                              allow=self.recipe.allow_empty_layers,
                              prunes=self.method.init_state == ElementState.PRUNE)
        self.ctx = MethodContext(
            views=views,
            state=state,
            coll=self.adapter.collectives,
            keep_counts=counts,
            global_budget=self.recipe.distribution == "global",
            total_steps=self.total_steps,
            distribution=self.recipe.distribution,
            trainable_views_fn=self._trainable_views,
        )
        self.method.setup(self.ctx)
        if not resuming:
            t0 = time.perf_counter()
            if self.method.needs_probe:
                self._probe(probe)
            self.method.initialize(self.ctx)
            self.update_seconds += time.perf_counter() - t0
            self.apply_masks()
        self._ever = EverActive(self.ctx.state) if self.method.dynamic else None
        logger.info(
            "dimred: %s at sparsity %.3f (%s, %s schedule) on %d parameters", self.recipe.method,
            self.recipe.sparsity, self.recipe.distribution, self.recipe.schedule.kind, len(views),
        )
        return self

    def _probe(self, data: ProbeData | None) -> None:
        ctx = self.ctx
        prober = Prober(self.adapter, self.model, data, ctx.trainable_views(), ctx.coll, self.adapter.check_collectives)
        t0 = time.perf_counter()
        self.method.probe(ctx, prober)
        logger.info("dimred: %s scored the entries in %.2f s (%d forward/backward passes)", self.recipe.method,
                    time.perf_counter() - t0, prober.passes)

    def _trainable_views(self) -> dict:
        """Views of every trainable parameter in model order, the managed ones being the manager's own."""
        canonical: dict[int, str] = {}
        for n, p in self.model.named_parameters():
            canonical.setdefault(id(p), n)
        others = {n: p for n, p in self.model.named_parameters() if p.requires_grad and n not in self.ctx.views
                  and canonical[id(p)] == n}
        extra = self.adapter.views(others) if others else {}
        order = [n for n, _ in self.model.named_parameters() if n in self.ctx.views or n in extra]
        return {n: self.ctx.views[n] if n in self.ctx.views else extra[n] for n in order}

    @property
    def ever(self) -> EverActive | None:
        """Bit-packed local masks of the entries active at least once (dynamic methods; the ITOP rate)."""
        return self._ever

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

    def own_tensors(self) -> list[torch.Tensor]:
        """The tensors this manager and its method hold: the packed masks, the ITOP bits, the method's
        state (scores, momenta, snapshots), the copies of frozen values (for memory accounting)."""
        self._require_prepared()
        out = [t for ps in self.ctx.state for t in (ps.keep_bits, ps.train_bits)]
        if self._ever is not None:
            out += list(self._ever.bits.values())
        out += tensors_in(vars(self.method), 4) + list(self._frozen.values())
        return out

    # ---- the step ------------------------------------------------------------------------
    def before_optimizer_step(self) -> None:
        """Before the optimizer step: the method observes and updates the topology, then the gradients
        of entries that are not TRAIN are zeroed. Runs once per step (later calls are no-ops)."""
        self._require_prepared()
        if self._before_done == self.step:
            return
        self._before_done = self.step
        ctx = self.ctx
        result = None
        if self._gradients_finite():
            self.method.observe(ctx, self.step)
            t0 = time.perf_counter()
            result = self.method.update(ctx, self.step)
        elif self.method.may_update(ctx, self.step):
            self.skipped_updates += 1
            logger.warning("dimred: step %d: non-finite gradients; the topology update of this step is skipped "
                           "(masks unchanged)", self.step)
        if result is not None:
            seconds = time.perf_counter() - t0
            self.update_seconds += seconds
            record = {k.removeprefix("dimred/"): float(v) for k, v in result.items()}
            self.topology_history.append({"step": float(self.step), "seconds": seconds, **record})
            if self._ever is not None:
                self._ever.update(ctx.state)
            self.apply_masks(propagate=False)
        held = self.optimizer.state_bytes() if result is not None and isinstance(self.optimizer, CompactOptimizer) \
            else None
        self._carry_out(ctx.take_requests(), changed=result is not None)
        if held is not None:
            self._record_release(held - self.optimizer.state_bytes())
        self.mask_gradients()

    def _gradients_finite(self) -> bool:
        """Whether every managed gradient entry is finite on every rank (one 1-element all-reduce); updates
        :attr:`nonfinite_streak`. A step whose gradients are not finite is not observed by the method.

        Tested through the sum of each local gradient (an inf or NaN anywhere makes it non-finite; one
        read pass, 8 ms per 62M fp32 entries on this CPU against 0.27 s for ``isfinite().all()``); a sum
        that overflows fp32 counts as non-finite too, which only gradients near 1e38 can do."""
        sums = [g.sum(dtype=torch.float32) for g in (v.grad() for v in self.ctx.views.values()) if g is not None]
        local = int(bool(sums) and not bool(torch.isfinite(torch.stack(sums)).all()))
        bad = int(self.adapter.check_collectives.all_reduce_max(torch.tensor([local]))[0])
        self.nonfinite_streak = self.nonfinite_streak + 1 if bad else 0
        self.nonfinite_steps += bad
        return not bad

    def _record_release(self, local: int) -> None:
        """Add the optimizer-state bytes the latest update gave back (negative: took) to its history
        entry: summed over ranks, and the largest on one rank (one small all-reduce)."""
        coll = self.ctx.coll
        slots = torch.zeros(coll.world_size, dtype=torch.int64)
        slots[coll.rank] = local
        per_rank = coll.all_reduce_sum(slots)
        self.topology_history[-1].update({"optimizer/released_bytes": float(per_rank.sum()),
                                          "optimizer/rank_released_bytes": float(per_rank.max())})

    def _carry_out(self, req: dict[str, Any], *, changed: bool) -> None:
        """What the method asked for during observe / update."""
        for op, key in req["lr"]:
            self._lr_request(op, key)
        if changed or req["moment_resets"]:
            self.sync_optimizer(req["moment_resets"])
        elif isinstance(self.optimizer, CompactOptimizer) and not self._optimizer_in_sync():
            self.sync_optimizer({})  # its state was loaded from elsewhere: the manager's masks rule
        if req["restart"] and self.optimizer is not None:
            surgery.restart(self.optimizer)
        self.skipping = bool(req["skip"])

    def after_optimizer_step(self, flats: set[int] | None = None, *, count: bool = True) -> None:
        """After the optimizer wrote the masters (of the flat tensors ``flats``, if given): keep PRUNE
        entries at 0 and FREEZE entries at their value, run the method's ``after_step``; count the step."""
        self._require_prepared()
        self.enforce_weights(flats)
        self.ctx.written_flats = flats
        try:
            wrote = self.method.after_step(self.ctx, self.step)
        finally:
            self.ctx.written_flats = None
        if wrote:
            self._capture_frozen()
        if count:
            self.count_step()

    def count_step(self) -> None:
        self.step += 1
        self.skipping = False

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

    def sync_optimizer(self, resets: dict[str, torch.Tensor] | None = None) -> None:
        """Give the optimizer the current TRAIN masks and restart the moments of ``resets``' entries.

        A compact optimizer gets the masks (re-compacting its state); torch's SGD / Adam / AdamW get the
        moments of the reset entries zeroed. Any other optimizer with state raises (never silently).
        """
        resets = resets or {}
        if isinstance(self.optimizer, CompactOptimizer):
            self.adapter.sync_optimizer(self.optimizer, self.ctx.views, self.ctx.state, resets)
            self._synced_epoch = self.optimizer.mask_epoch
        elif self.optimizer is not None and resets:
            surgery.reset_entries(self.optimizer, {self.ctx.views[n].param: m for n, m in resets.items()})

    def _optimizer_in_sync(self) -> bool:
        """Whether the optimizer is compact and its masks are the ones this manager last gave it."""
        return isinstance(self.optimizer, CompactOptimizer) and self.optimizer.mask_epoch == self._synced_epoch

    def _lr_request(self, op: str, key: str) -> None:
        """Save or restore the LR schedule: the scheduler's state and its optimizer's learning rates."""
        sched = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate wraps it
        opt = getattr(sched, "optimizer", None) or self.optimizer
        if opt is None:
            raise RuntimeError(f"{self.recipe.method} rewinds the learning rate, but no optimizer is attached")
        if op == "save":
            self._lr_saved[key] = {"scheduler": None if sched is None else copy.deepcopy(sched.state_dict()),
                                   "lrs": [float(g["lr"]) for g in opt.param_groups]}
            return
        saved = self._lr_saved[key]
        if sched is not None and saved["scheduler"] is not None:
            sched.load_state_dict(copy.deepcopy(saved["scheduler"]))
        for g, lr in zip(opt.param_groups, saved["lrs"]):
            g["lr"] = lr
        logger.info("dimred: step %d: LR schedule restored to its state %r (lr %s)", self.step, key, saved["lrs"])

    def attach(self, optimizer: Any, *, pre_step: bool = True, lr_scheduler: Any = None) -> DimRedManager:
        """Run the manager around every optimizer step.

        * plain PyTorch / DDP: ``optimizer`` is the torch optimizer; the manager runs in a step
          pre-hook (once per step) and a post-hook. If you clip gradients, the norm must see masked
          gradients: call :meth:`before_optimizer_step` yourself between ``backward()`` and the clipping
          (``pre_step=False`` says so; the pre-hook then finds the step done).
        * DeepSpeed ZeRO: ``optimizer`` is the engine (or its optimizer); the adapter hooks the
          ZeRO step itself (before the norm, and after the client optimizer's update).

        ``lr_scheduler`` is the LR scheduler the training loop steps (the engine's under DeepSpeed, if
        none is given); methods that rewind the learning rate save and restore its state.

        A :class:`~dimred_dist.optim.CompactOptimizer` gets the TRAIN masks now and after every
        topology change, so it keeps state for TRAIN entries only.
        """
        self._require_prepared()
        inner = getattr(optimizer, "optimizer", optimizer) if isinstance(self.adapter, ReplicatedAdapter) else None
        if self.method.dynamic and inner is not None:
            surgery.check_supported(inner)  # topology updates reset moments: refuse what cannot be reset, now
        self.optimizer = self.adapter.install(self, optimizer, pre_step=pre_step)
        self.lr_scheduler = lr_scheduler if lr_scheduler is not None else getattr(optimizer, "lr_scheduler", None)
        self.sync_optimizer()
        self._apply_moments()
        self._capture_frozen()
        return self

    # ---- optimizer moments in the layout-independent form ---------------------------------
    def optimizer_moments(self) -> tuple[float, dict[str, dict[str, torch.Tensor]]] | None:
        """``(step, {moment: {parameter: this rank's range of it, flat, 0 where not TRAIN}})`` of an attached
        compact optimizer, for every trainable parameter (managed or not); None before its first step."""
        opt = self.optimizer
        if not isinstance(opt, CompactOptimizer):
            return None
        views = self.ctx.trainable_views()
        out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in opt.moment_names}
        steps = []
        for tensor, slots in self.adapter.moment_slots(views):
            got = opt.dense_moments(tensor)
            if got is None:
                return None
            steps.append(got[0])
            for name, off, n in slots:
                for k in opt.moment_names:
                    out[k][name] = got[1][k][off : off + n].detach().cpu()
        for k in opt.moment_names:  # parameters with no entries on this rank: empty ranges
            for name, v in views.items():
                out[k].setdefault(name, torch.zeros(0, dtype=v.weight().dtype))
        return (max(steps) if steps else 0.0), out

    def restore_moments(self, step: float, moments: dict[str, dict[str, torch.Tensor]]) -> None:
        """Set the compact optimizer's moments from :meth:`optimizer_moments`' form (resharded by the loader to
        this rank's ranges); applied at :meth:`attach` if no optimizer is attached yet."""
        self._pending_moments = (step, moments)
        if self.optimizer is not None:
            self._apply_moments()

    def _apply_moments(self) -> None:
        pending, self._pending_moments = self._pending_moments, None
        if pending is None:
            return
        if not isinstance(self.optimizer, CompactOptimizer):
            logger.warning("dimred: the checkpoint's optimizer moments are not restored: the optimizer is not compact")
            return
        step, moments = pending
        missing = [k for k in self.optimizer.moment_names if k not in moments]
        if missing:
            raise ValueError(f"the checkpoint holds no optimizer moments {missing} for {type(self.optimizer).__name__}")
        for tensor, slots in self.adapter.moment_slots(self.ctx.trainable_views()):
            dense = {k: torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
                     for k in self.optimizer.moment_names}
            for name, off, n in slots:
                for k in dense:
                    dense[k][off : off + n] = moments[k][name].to(tensor.device)
            self.optimizer.set_dense_moments(tensor, step, dense)
        logger.info("dimred: restored the optimizer moments of step %g for another layout", step)

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
        out = compute_metrics(
            self.ctx.state, list(self.ctx.views), self.ctx.coll, ever=self._ever, optimizer=self.optimizer,
            update_seconds=self.update_seconds, history=self.topology_history,
        )
        out["dimred/nonfinite_steps"] = float(self.nonfinite_steps)
        out["dimred/skipped_updates"] = float(self.skipped_updates)
        out.update(self.method.metrics())
        return out

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
        """Step, masks, method state (plain data), LR schedule snapshots and the method's tensor state."""
        return {"step": self.step, "masks": self.state.state_dict(), "method": self.method.state_dict(),
                "lr_saved": _json_or_empty(self._lr_saved), "tensors": self.method.tensor_state(),
                "counters": self._counters(), **({"ever": dict(self._ever.bits)} if self._ever is not None else {})}

    def state_dict_plain(self) -> dict[str, Any]:
        """The plain-data (JSON) part of :meth:`state_dict` besides step and masks: what a checkpoint
        manifest records as ``method_state`` (the metric counters included, so logged curves go on)."""
        return {"method": self.method.state_dict(), "lr_saved": _json_or_empty(self._lr_saved),
                "counters": self._counters()}

    def _counters(self) -> dict[str, Any]:
        return {"history": copy.deepcopy(self.topology_history), "update_seconds": self.update_seconds,
                "nonfinite_steps": self.nonfinite_steps, "skipped_updates": self.skipped_updates}

    @staticmethod
    def split_plain(plain: dict[str, Any]) -> dict[str, Any]:
        """:meth:`load_state_dict` keys from a manifest's ``method_state`` (format 1 held the method's only)."""
        if set(plain) <= {"method", "lr_saved", "counters"}:
            return {"method": plain.get("method", {}), "lr_saved": plain.get("lr_saved", {}),
                    **({"counters": plain["counters"]} if "counters" in plain else {})}
        return {"method": plain, "lr_saved": {}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; ``counters`` and ``ever`` (bit-packed local masks) are optional: without
        them the metric counters restart at zero and the ITOP history at the loaded topology."""
        self.state.load_state_dict(sd["masks"])
        self.method.load_state_dict(sd.get("method", {}))
        self.method.load_tensor_state(sd.get("tensors", {}))
        self._lr_saved = copy.deepcopy(sd.get("lr_saved", {}))
        self.step = int(sd["step"])
        self._before_done = -1
        self.apply_masks()
        counters = sd.get("counters")
        if counters is not None:
            self.topology_history = [{k: float(v) for k, v in h.items()} for h in counters["history"]]
            self.update_seconds = float(counters["update_seconds"])
            self.nonfinite_steps = int(counters.get("nonfinite_steps", 0))
            self.skipped_updates = int(counters.get("skipped_updates", 0))
        if self._ever is not None:
            self._ever = EverActive(self.state)
            for name, bits in (sd.get("ever") or {}).items():
                self._ever.bits[name] |= bits.to(self._ever.bits[name].device)
            self._ever.recount()
        if self.optimizer is not None:
            self.sync_optimizer()


def _json_or_empty(saved: dict[str, Any]) -> dict[str, Any]:
    """LR snapshots as plain data for a checkpoint; a scheduler whose state is not JSON is left out, logged."""
    try:
        return json.loads(json.dumps(saved))
    except TypeError:
        logger.warning("dimred: the LR scheduler's state is not plain data; its snapshots are not checkpointed")
        return {}


def _checksum(codes: torch.Tensor) -> int:
    idx = torch.arange(1, codes.numel() + 1, dtype=torch.int64)
    return int(((codes.to(torch.int64) + 1) * ((idx * 2654435761) % 2147483647)).sum() % (1 << 61))
