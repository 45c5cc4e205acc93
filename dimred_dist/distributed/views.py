"""Shard views: what a method sees of one managed parameter on this rank.

A view gives the parameter's global shape, the global flat range ``[start, end)`` this rank owns,
and the local slices of the (fp32 master) weight and of the gradient, as 1-D tensors that share
storage with the real ones, so in-place writes land where the optimizer reads. Without sharding
(one process, DDP) the range is the whole tensor and every rank holds a replica.

Subclasses for ZeRO stages live beside this file; method and manager code only use this interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class ShardView:
    """One managed parameter as seen by this rank.

    Attributes:
        name: Canonical parameter name.
        shape: Global shape of the parameter.
        start: First global flat index owned here.
        end: One past the last global flat index owned here.
        replicated: True if every rank holds the same entries (no sharding), so the ranks' states
            must agree and can be checked against each other.
    """

    name: str
    shape: tuple[int, ...]
    start: int
    end: int
    replicated: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def local_numel(self) -> int:
        return self.end - self.start

    def weight(self) -> torch.Tensor:
        """Local 1-D slice of the weight the optimizer updates (shares storage; write in place)."""
        raise NotImplementedError

    def grad(self) -> torch.Tensor | None:
        """Local 1-D slice of the (reduced) gradient, or None when there is none yet."""
        raise NotImplementedError


class FullView(ShardView):
    """The whole parameter on this rank: a single process, or a DDP replica."""

    def __init__(self, name: str, param: nn.Parameter, *, replicated: bool = False) -> None:
        super().__init__(name, tuple(param.shape), 0, param.numel(), replicated)
        self.param = param

    def weight(self) -> torch.Tensor:
        return self.param.data.view(-1)

    def grad(self) -> torch.Tensor | None:
        g = self.param.grad
        return None if g is None else g.view(-1)


def full_views(params: dict[str, nn.Parameter], *, replicated: bool) -> dict[str, ShardView]:
    """Views of whole parameters (no sharding)."""
    return {name: FullView(name, p, replicated=replicated) for name, p in params.items()}
