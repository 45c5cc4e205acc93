"""Shard views and step hooks for DeepSpeed ZeRO stages 1, 2 and 3 (the only DeepSpeed-aware module).

Where a rank's entries live (DeepSpeed 0.16 - 0.19):

* ZeRO-1/2 (``DeepSpeedZeroOptimizer``): each parameter group is flattened and split into
  contiguous partitions in rank order. ``param._hp_mapping`` (None when the rank owns nothing of
  the parameter) gives the owned range of the flattened parameter (``lp_fragment_address``), the
  fp32 master slice (``hp_fragment``, a view of ``single_partition_of_fp32_groups[g]``, the tensor
  the client optimizer updates) and its offset there. Inside ``step()`` the reduced gradient of the
  owned range is ``averaged_gradients[g][param._index_in_param_group]`` (or a slice of its
  ``flat_partition`` with fp32 gradient accumulation of bf16 weights).
* ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): every parameter is split evenly in rank order
  (``ds_tensor``, the last rank padded); its fp32 master is a slice of
  ``fp32_partitioned_groups_flat[sub_group]`` at ``grad_position``; inside ``step()`` the reduced
  gradient slice is ``averaged_gradients[sub_group][i]``.

The manager runs inside the ZeRO optimizer's ``step`` (instance-level wrapper): after the gradients
are reduced and before DeepSpeed computes the norm and clips, so a topology update sees dense
gradients and the norm sees only TRAIN entries. Weights are enforced in a step post-hook of the
client optimizer, before ZeRO copies the fp32 master into the module weights and gathers them, so
no extra communication is needed. Edits outside a step (the initial topology, a resume) are
propagated with DeepSpeed's own copy-and-gather routines.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch
import torch.nn as nn

from dimred_dist.distributed.adapter import drop_gradients
from dimred_dist.distributed.collectives import Collectives
from dimred_dist.distributed.topology import Topology
from dimred_dist.distributed.views import ShardView

_Z12 = "DeepSpeedZeroOptimizer"
_Z3 = "DeepSpeedZeroOptimizer_Stage3"


def zero_optimizer_of(engine_or_optimizer: Any) -> Any:
    """The ZeRO optimizer wrapper inside a DeepSpeed engine, an HF/accelerate wrapper, or itself."""
    obj = engine_or_optimizer
    for _ in range(4):
        if type(obj).__name__ in (_Z12, _Z3, "BF16_Optimizer"):
            return obj
        inner = getattr(obj, "optimizer", None)
        if inner is None:
            break
        obj = inner
    raise TypeError(
        f"no DeepSpeed ZeRO optimizer found in {type(engine_or_optimizer).__name__}; dimred_dist's ZeRO adapter needs "
        "a DeepSpeed engine with zero_optimization.stage 1, 2 or 3"
    )


def _check_supported(opt: Any) -> int:
    name = type(opt).__name__
    if name == "BF16_Optimizer":
        raise ValueError(
            "ZeRO stage 1 with bf16 weights and fp32 gradient accumulation (DeepSpeed's BF16_Optimizer) keeps full "
            "gradients on every rank; dimred_dist does not serve it. Use ZeRO stage 2, or drop "
            "data_types.grad_accum_dtype=fp32."
        )
    if getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False):
        raise ValueError("ZeRO optimizer offload is not supported by dimred_dist yet; remove offload_optimizer")
    if getattr(opt, "offload_param", False):
        raise ValueError("ZeRO-3 parameter offload is not supported by dimred_dist yet; remove offload_param")
    if getattr(opt, "round_robin_gradients", False):
        raise ValueError(
            "round_robin_gradients=true breaks DeepSpeed's own parameter-to-partition mapping; set it to false"
        )
    if name == _Z3:
        return 3
    return 2 if getattr(opt, "partition_gradients", False) else 1


def gathered_parameters(params: list[nn.Parameter], zero_stage: int | None) -> contextlib.AbstractContextManager:
    """A context in which the module parameters hold their full values: a ZeRO-3 gather, else nothing."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, enabled=True)


class ZeroView(ShardView):
    """One parameter's owned range under ZeRO: fp32 master slice, and gradient slice inside ``step``."""

    def __init__(self, name: str, shape: tuple[int, ...], start: int, end: int, master: torch.Tensor,
                 flat: torch.Tensor | None, offset: int, grad_fn) -> None:
        super().__init__(name, tuple(shape), start, end, replicated=False)
        self.master = master
        self.flat = flat
        self.offset = offset
        self._grad_fn = grad_fn

    def weight(self) -> torch.Tensor:
        return self.master

    def grad(self) -> torch.Tensor | None:
        return self._grad_fn()


class ZeroAdapter:
    """Builds ZeRO shard views of a DeepSpeed engine and hooks the manager into its step.

    Args:
        engine: A ``deepspeed.DeepSpeedEngine`` (or anything holding its ZeRO optimizer; scoring passes
            before training, see :meth:`backward`, need the engine itself).
        module: The engine's module (default: ``engine.module``).
    """

    #: Second derivatives cannot be taken through ZeRO's gradient hooks: Hessian-vector products use
    #: finite differences of two gradient evaluations.
    supports_double_backward = False

    def __init__(self, engine: Any, module: nn.Module | None = None) -> None:
        self.engine = engine if hasattr(engine, "backward") and hasattr(engine, "module") else None
        self.zero = zero_optimizer_of(engine)
        stage = _check_supported(self.zero)
        self.module = module if module is not None else engine.module
        group = getattr(self.zero, "dp_process_group", None)
        self.topology = Topology.detect(zero_stage=stage, group=group)
        #: Selection, counting and agreement checks all run over the data-parallel group.
        self.collectives: Collectives = self.topology.collectives()
        self.check_collectives: Collectives = self.collectives
        # Refuse before prepare() edits any weight: a failed set-up must leave the engine as it was.
        self._check_installable()
        self._in_step = False
        self._z3_index: dict[int, tuple[int, int]] = {}

    def _check_installable(self) -> None:
        from dimred_dist.optim.compact import CompactOptimizer

        if not isinstance(self.inner, CompactOptimizer):
            raise TypeError(
                f"DeepSpeed drives a {type(self.inner).__name__}, which keeps dense state for pruned and frozen "
                "entries. "
                "Pass dimred_dist.optim.CompactAdamW (or CompactSGD) as the client optimizer to deepspeed.initialize "
                "and remove the 'optimizer' section of the DeepSpeed config (with the HF Trainer: "
                "optimizer_cls_and_kwargs=(CompactAdamW, {...}))."
            )
        if getattr(self.zero, "_dimred_installed", False):
            raise RuntimeError("a DimRedManager is already installed on this DeepSpeed engine")

    @property
    def inner(self) -> torch.optim.Optimizer:
        """The client optimizer DeepSpeed drives."""
        return self.zero.optimizer

    # ---- views ---------------------------------------------------------------------------
    def views(self, params: dict[str, nn.Parameter]) -> dict[str, ShardView]:
        for name, p in params.items():
            if not p.requires_grad:
                raise ValueError(f"managed parameter {name!r} has requires_grad=False; exclude it from the targets")
        if self.topology.zero_stage == 3:
            return {n: self._z3_view(n, p) for n, p in params.items()}
        return {n: self._z12_view(n, p) for n, p in params.items()}

    def _z12_view(self, name: str, p: nn.Parameter) -> ZeroView:
        m = getattr(p, "_hp_mapping", None)
        if m is None:
            empty = torch.zeros(0, dtype=torch.float32)
            return ZeroView(name, tuple(p.shape), 0, 0, empty, None, 0, lambda: empty)
        start, n = m.lp_fragment_address.start, m.lp_fragment_address.numel
        g, off = m.param_group_index, m.hp_fragment_address.start
        flat = self.zero.single_partition_of_fp32_groups[g]
        master = flat.narrow(0, off, n)

        def grad() -> torch.Tensor | None:
            if not self._in_step:
                return None
            ag = self.zero.averaged_gradients[g]
            flat_grad = getattr(ag, "flat_partition", None)
            if flat_grad is not None:
                return flat_grad.narrow(0, off, n)
            return ag[p._index_in_param_group].view(-1)

        return ZeroView(name, tuple(p.shape), start, start + n, master, flat, off, grad)

    def _z3_view(self, name: str, p: nn.Parameter) -> ZeroView:
        z = self.zero
        shape = tuple(p.ds_shape)
        pn = p.ds_tensor.ds_numel
        start = min(z._get_param_partition_rank(p) * pn, p.ds_numel)
        end = min(start + pn, p.ds_numel)
        sg, off, _ = z.grad_position[z.get_param_id(p)]
        idx = next(i for i, q in enumerate(z.fp16_groups[sg]) if q is p)
        flat = z.fp32_partitioned_groups_flat[sg]
        master = flat.narrow(0, off, end - start)

        def grad() -> torch.Tensor | None:
            if not self._in_step:
                return None
            return z.averaged_gradients[sg][idx].view(-1).narrow(0, 0, end - start)

        return ZeroView(name, shape, start, end, master, flat, off, grad)

    # ---- optimizer -----------------------------------------------------------------------
    def sync_optimizer(self, optimizer, views: dict[str, ShardView], state, reset: dict) -> None:
        """Build each flat partition's train mask (unmanaged entries TRAIN) and hand it over."""
        by_flat: dict[int, list[ShardView]] = {}
        for v in views.values():
            if v.flat is not None and v.local_numel:
                by_flat.setdefault(id(v.flat), []).append(v)
        for flat in self._flats():
            owned = by_flat.get(id(flat), [])
            if owned:
                mask = torch.ones(flat.numel(), dtype=torch.bool)
                rst = torch.zeros(flat.numel(), dtype=torch.bool)
                for v in owned:
                    mask[v.offset : v.offset + v.local_numel] = state[v.name].train
                    if v.name in reset:
                        rst[v.offset : v.offset + v.local_numel] = reset[v.name]
                optimizer.set_train_mask(flat, mask, reset=rst)

    def moment_slots(self, views: dict[str, ShardView]) -> list[tuple[torch.Tensor, list[tuple[str, int, int]]]]:
        """The flat fp32 partitions the client optimizer keeps moments for, each with the (view, offset in the
        flat, entries) it holds."""
        by_flat: dict[int, list[tuple[str, int, int]]] = {}
        for name, v in views.items():
            if v.flat is not None and v.local_numel:
                by_flat.setdefault(id(v.flat), []).append((name, v.offset, v.local_numel))
        return [(flat, by_flat[id(flat)]) for flat in self._flats() if id(flat) in by_flat]

    def _flats(self) -> list[torch.Tensor]:
        """The flat fp32 tensors the client optimizer updates (ZeRO-3 lists them only inside a step)."""
        if self.topology.zero_stage == 3:
            return list(self.zero.fp32_partitioned_groups_flat)
        return list(self.zero.single_partition_of_fp32_groups)

    # ---- hooks ---------------------------------------------------------------------------
    def install(self, manager, optimizer: Any = None, *, pre_step: bool = True) -> torch.optim.Optimizer:
        """Run the manager inside the ZeRO step: before the norm, and after the client update.

        Returns the client optimizer, which must be a compact (mask-aware) optimizer.
        """
        if optimizer is not None and zero_optimizer_of(optimizer) is not self.zero:
            raise ValueError("the optimizer passed to attach() is not the one of this adapter's DeepSpeed engine")
        if not pre_step:
            raise ValueError("under DeepSpeed the manager must run before the norm; pre_step=False is not possible")
        self._check_installable()
        zero, orig_step = self.zero, self.zero.step

        def step(this, *args, **kwargs):
            self._in_step = True
            try:
                manager.before_optimizer_step()
            finally:
                self._in_step = False
            out = orig_step(*args, **kwargs)
            manager.count_step()
            return out

        def pre(opt, args, kwargs):
            if manager.skipping:  # ZeRO steps one flat partition at a time: drop this one's gradient
                drop_gradients(opt)

        zero.step = types.MethodType(step, zero)
        zero._dimred_installed = True
        self._orig_step = orig_step
        self._hooks = [
            self.inner.register_step_pre_hook(pre),
            self.inner.register_step_post_hook(
                lambda opt, args, kwargs: manager.after_optimizer_step(self._stepped(opt), count=False)
            ),
        ]
        return self.inner

    def uninstall(self) -> None:
        """Give the ZeRO optimizer its own step back."""
        if getattr(self.zero, "_dimred_installed", False):
            del self.zero.step  # the class's own step again
            for h in self._hooks:
                h.remove()
            self.zero._dimred_installed = False

    def _stepped(self, opt) -> set[int]:
        """Ids of the flat tensors the client optimizer just stepped (ZeRO steps one group at a time)."""
        return {id(p) for g in opt.param_groups for p in g["params"]}

    # ---- scoring passes outside a training step ------------------------------------------
    def probe_model(self, module: nn.Module) -> Any:
        """What a probe's loss function calls: the engine (its forward gathers ZeRO-3 parameters)."""
        if self.engine is None:
            raise RuntimeError("scoring passes under ZeRO need the DeepSpeed engine; build ZeroAdapter(engine)")
        return self.engine

    def backward(self, loss: torch.Tensor) -> None:
        """Backward through the engine as the last micro-batch of a step, so ZeRO reduces the gradients
        into each rank's partition (the mean over the data-parallel ranks), without an optimizer step."""
        e = self.probe_model(self.module)
        prev = e._is_gradient_accumulation_boundary
        e.set_gradient_accumulation_boundary(True)
        try:
            e.backward(loss, scale_wrt_gas=False)
        finally:
            e._is_gradient_accumulation_boundary = prev

    @contextlib.contextmanager
    def gradient_scope(self):
        """Between :meth:`backward` and :meth:`discard_gradients` the views read the reduced gradients."""
        self._in_step = True
        try:
            yield float(getattr(self.zero, "loss_scale", 1.0) or 1.0)
        finally:
            self._in_step = False

    def discard_gradients(self, module: nn.Module) -> None:
        """Drop the reduced gradients without a step, as ZeRO does after an overflow (its own routine)."""
        z = self.zero
        if self.topology.zero_stage == 3:
            z.zero_grad(set_to_none=True)
            z.averaged_gradients = {}
            return
        z.zero_grad(set_to_none=True)
        z._release_preflattened_grad_buffers()
        for k in list(z.averaged_gradients):
            z.averaged_gradients[k] = None
            if k in getattr(z, "all_grad_tensors", {}):
                z.all_grad_tensors[k] = None
        z.micro_step_id = -1  # stage_1_and_2.INITIAL_MICRO_STEP_ID, as step() leaves it

    def other_tensors(self, module: nn.Module) -> list[torch.Tensor]:
        """This rank's copies of the module's floating tensors that have no fp32 master: buffers and
        frozen parameters (ZeRO-3: a frozen parameter's partition, or its full copy if persistent)."""
        out = [b for b in module.buffers() if b.is_floating_point()]
        for p in module.parameters():
            if p.requires_grad or not p.is_floating_point():
                continue
            if hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False):
                out.append(p.ds_tensor.data)
            else:
                out.append(p.data)
        return out

    def weights_edited(self) -> None:
        """Copy edited fp32 masters into the module weights and gather them (outside a step)."""
        z = self.zero
        if self.topology.zero_stage == 3:
            z._partition_all_parameters()  # parameters still gathered after a forward would keep old values
            for sg in range(len(z.fp16_partitioned_groups_flat)):
                z._reassign_or_swap_out_partitioned_parameters(sg)
            if z.persistent_parameters:
                z.persistent_parameters[0].all_gather(z.persistent_parameters)
            z.invalidate_secondary_tensor()
        else:
            z.update_lp_params()
