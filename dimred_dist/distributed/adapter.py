"""Shard adapters: build the views and collectives for one way of distributing a model.

:class:`ReplicatedAdapter` serves a single process and DDP (every rank holds whole parameters).
The ZeRO adapters subclass it and add the step hooks DeepSpeed needs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from dimred_dist.distributed.collectives import Collectives
from dimred_dist.distributed.topology import Topology
from dimred_dist.distributed.views import ShardView, full_views


class ReplicatedAdapter:
    """Whole parameters on every rank: a single process, or DDP (replicas agree after all-reduce)."""

    #: The probe can differentiate gradients again (GraSP's Hessian-gradient product by double backward).
    supports_double_backward = True

    def __init__(self, topology: Topology | None = None) -> None:
        self.topology = topology or Topology.detect()
        if self.topology.zero_stage != 0:
            raise ValueError(f"ReplicatedAdapter serves ZeRO stage 0 only, got {self.topology.zero_stage}")
        self._check_coll = self.topology.collectives()
        self._handles: list = []

    @property
    def collectives(self) -> Collectives:
        """Collectives for selection and counting: identities, since every rank holds every entry."""
        return Collectives()

    @property
    def check_collectives(self) -> Collectives:
        """Collectives across the replicas, to verify that they agree."""
        return self._check_coll

    def views(self, params: dict[str, nn.Parameter]) -> dict[str, ShardView]:
        return full_views(params, replicated=self.topology.distributed)

    def sync_optimizer(self, optimizer, views: dict[str, ShardView], state, reset: dict) -> None:
        """Hand the TRAIN masks of the managed parameters to a compact optimizer."""
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for name, v in views.items():
            if id(v.param) not in owned:
                raise ValueError(f"managed parameter {name!r} is not among the optimizer's parameters")
            optimizer.set_train_mask(v.param, state[name].train, reset=reset.get(name))

    def moment_slots(self, views: dict[str, ShardView]) -> list[tuple[torch.Tensor, list[tuple[str, int, int]]]]:
        """The tensors a compact optimizer keeps moments for, each with the (view, offset, entries) it holds."""
        return [(v.param, [(name, 0, v.local_numel)]) for name, v in views.items() if v.local_numel]

    def install(self, manager, optimizer: torch.optim.Optimizer, *, pre_step: bool = True) -> torch.optim.Optimizer:
        """Hook a torch optimizer: the manager before and after each step.

        The pre-hook runs ``before_optimizer_step`` (a no-op if the training loop already called it
        this step, before clipping: ``pre_step=False`` says so), then drops every gradient of a step
        the manager skips, so the optimizer leaves all its parameters and state alone (torch's
        optimizers skip parameters without a gradient).
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}; under DeepSpeed build the manager "
                "with dimred_dist.distributed.zero.ZeroAdapter(engine)"
            )
        self.uninstall()

        def pre(opt, args, kwargs):
            manager.before_optimizer_step()
            if manager.skipping:
                drop_gradients(opt)

        self._handles.append(optimizer.register_step_pre_hook(pre))
        self._handles.append(optimizer.register_step_post_hook(lambda *_: manager.after_optimizer_step()))
        return optimizer

    def uninstall(self) -> None:
        """Remove the hooks :meth:`install` added."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def weights_edited(self) -> None:
        """Nothing to propagate: the views are the module's own parameters."""

    # ---- scoring passes outside a training step ------------------------------------------
    def probe_model(self, module: nn.Module) -> nn.Module:
        """What a probe's loss function calls: the bare module (every replica runs the same batches,
        so no gradient is exchanged and the scores do not depend on the world size)."""
        return module

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @contextlib.contextmanager
    def gradient_scope(self):
        """The views read ``param.grad``; yields the loss scale (none here)."""
        yield 1.0

    def discard_gradients(self, module: nn.Module) -> None:
        for p in module.parameters():
            p.grad = None

    def other_tensors(self, module: nn.Module) -> list[torch.Tensor]:
        """The module's floating tensors that are not trainable parameters: buffers, frozen parameters."""
        out = [b for b in module.buffers() if b.is_floating_point()]
        return out + [p.data for p in module.parameters() if not p.requires_grad and p.is_floating_point()]


def drop_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Set the gradient of every parameter the optimizer is about to step to None (a skipped step)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
