"""The interface between the manager and a way of distributing a model (a shard adapter).

The manager never looks inside DeepSpeed or DDP; everything it needs from the distribution goes
through these few members. :class:`~dimred_dist.distributed.adapter.ReplicatedAdapter` (one process,
DDP) and :class:`~dimred_dist.distributed.zero.ZeroAdapter` (DeepSpeed ZeRO 1/2/3) implement it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

from dimred_dist.distributed.collectives import Collectives
from dimred_dist.distributed.topology import Topology
from dimred_dist.distributed.views import ShardView


@runtime_checkable
class ShardAdapter(Protocol):
    """What a manager needs from the distribution of its model.

    Attributes:
        topology: Rank, world size, group and ZeRO stage.
        collectives: Collectives for selection and counting over the ranks that share the entries
            (identities where every rank holds every entry).
        check_collectives: Collectives over all ranks, to check that replicas agree.
    """

    topology: Topology
    #: Whether a probe may differentiate gradients again (GraSP by double backward).
    supports_double_backward: bool

    @property
    def collectives(self) -> Collectives: ...

    @property
    def check_collectives(self) -> Collectives: ...

    def views(self, params: dict[str, nn.Parameter]) -> dict[str, ShardView]:
        """A view of this rank's range of each parameter (its fp32 master and reduced gradient)."""
        ...

    def install(self, manager: Any, optimizer: Any, *, pre_step: bool = True) -> torch.optim.Optimizer:
        """Run the manager around every optimizer step; returns the optimizer that really steps.

        The hooks call ``manager.before_optimizer_step()`` before the gradient norm,
        ``manager.after_optimizer_step(flats)`` after each update of the masters (before they are copied
        into the module weights) and count the step; while ``manager.skipping`` is true the optimizer
        must not apply the step (the adapters drop the gradients it sees).
        """
        ...

    def uninstall(self) -> None:
        """Remove what :meth:`install` added."""
        ...

    def sync_optimizer(self, optimizer: Any, views: dict[str, ShardView], state: Any,
                       reset: dict[str, torch.Tensor]) -> None:
        """Hand the TRAIN masks to a compact optimizer; ``reset``: local masks whose moments restart."""
        ...

    def moment_slots(self, views: dict[str, ShardView]) -> list[tuple[torch.Tensor, list[tuple[str, int, int]]]]:
        """The tensors a compact optimizer keeps moments for, each with the (view name, offset, entries) of
        the views it holds (checkpoints save and restore moments per view, by global range)."""
        ...

    def weights_edited(self) -> None:
        """Propagate masters edited outside a step into every weight copy the framework keeps."""
        ...

    # ---- scoring passes outside a training step (dimred_dist.distributed.probe) ----------------
    def probe_model(self, module: nn.Module) -> Any:
        """What a probe's loss function calls (the module, or the DeepSpeed engine)."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backward so that the views then read this rank's reduced gradient, without an optimizer step."""
        ...

    def gradient_scope(self) -> contextlib.AbstractContextManager[float]:
        """A context in which the views read those gradients; yields the loss scale to divide out."""
        ...

    def discard_gradients(self, module: nn.Module) -> None:
        """Drop every gradient the probe's backward left, as if no step had been prepared."""
        ...

    def other_tensors(self, module: nn.Module) -> list[torch.Tensor]:
        """This rank's floating tensors without an fp32 master (buffers, frozen parameters)."""
        ...
