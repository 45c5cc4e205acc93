"""The few collectives methods may use: small sums of counts, never weight or mask tensors."""

from __future__ import annotations

import torch
import torch.distributed as dist


class Collectives:
    """Identity collectives of a single process; the base of every distributed variant."""

    rank: int = 0
    world_size: int = 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of ``t`` over all ranks (returns the reduced tensor)."""
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of ``t`` over all ranks."""
        return t

    def barrier(self) -> None:
        """Wait for all ranks."""


class TorchCollectives(Collectives):
    """Collectives over a ``torch.distributed`` process group (gloo or NCCL).

    Tensors are reduced on the device the group's backend expects (CPU for gloo) and handed back
    on the caller's device.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu") -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized; call init_process_group first")
        self.group = group
        self.device = torch.device(device)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _reduce(self, t: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        buf = t.to(self.device).clone()
        dist.all_reduce(buf, op=op, group=self.group)
        return buf.to(t.device)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.SUM)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.MAX)

    def barrier(self) -> None:
        dist.barrier(group=self.group)
