"""The one object that knows the distributed set-up: rank, world size, group, ZeRO stage.

Rules the rest of the code may rely on (and that are asserted here):

* the process group is a flat data-parallel group; no tensor or pipeline parallel dimension;
* every rank runs the same sequence of collectives in the same order (collectives are only
  issued from code paths that depend on rank-independent values: step, config, global shapes);
* ZeRO stage 0 means plain replication (single process or DDP).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from dimred_dist.distributed.collectives import Collectives, TorchCollectives


@dataclass(frozen=True)
class Topology:
    """Rank, world size, ZeRO stage and the process group of the data-parallel ranks.

    Attributes:
        rank: This process's rank in ``group``.
        world_size: Number of data-parallel ranks.
        zero_stage: 0 (replicated: single process / DDP), 1, 2 or 3.
        group: The process group (None: the default group, or no distribution).
    """

    rank: int = 0
    world_size: int = 1
    zero_stage: int = 0
    group: object | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {self.zero_stage}")

    @classmethod
    def detect(cls, zero_stage: int = 0, group: object | None = None) -> Topology:
        """The current process's topology: distributed if torch.distributed is initialized."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(group), dist.get_world_size(group), zero_stage, group)
        return cls(0, 1, zero_stage, None)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def collectives(self) -> Collectives:
        """Collectives over this topology's ranks (identities for a single process).

        NCCL reduces CUDA tensors only; every other backend (gloo, DeepSpeed's CPU ccl) takes CPU.
        """
        if not self.distributed:
            return Collectives()
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        return TorchCollectives(self.group, device=device)
