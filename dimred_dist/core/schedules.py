"""Schedules as small value types: when topology updates happen and how much they change.

All schedules are frozen dataclasses of plain numbers, evaluated with a step count; they hold no
state, so resuming only needs the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class OneShot:
    """A single topology change at ``at_step`` (pruning at initialization: step 0)."""

    at_step: int = 0

    def __post_init__(self) -> None:
        if self.at_step < 0:
            raise ValueError(f"at_step must be >= 0, got {self.at_step}")

    def is_update_step(self, step: int) -> bool:
        return step == self.at_step


@dataclass(frozen=True, kw_only=True)
class PeriodicUpdate:
    """Updates every ``interval`` steps in ``[start, end)`` (``end`` exclusive; step 0 never updates).

    Attributes:
        interval: Steps between two topology updates (Delta T in RigL).
        start: First step at which an update may happen.
        end: Updates stop at this step (T_end in RigL).
    """

    interval: int
    start: int = 1
    end: int

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"update interval must be >= 1, got {self.interval}")
        if self.end < self.start:
            raise ValueError(f"update end {self.end} is before start {self.start}")

    def is_update_step(self, step: int) -> bool:
        return step > 0 and self.start <= step < self.end and step % self.interval == 0


@dataclass(frozen=True, kw_only=True)
class CosineDecay:
    """``value * (1 + cos(pi * step / end)) / 2`` for step < end, else 0 (RigL's drop fraction)."""

    value: float
    end: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"drop fraction must be in [0, 1], got {self.value}")
        if self.end < 1:
            raise ValueError(f"cosine decay end must be >= 1, got {self.end}")

    def __call__(self, step: int) -> float:
        if step >= self.end:
            return 0.0
        return self.value * (1.0 + math.cos(math.pi * step / self.end)) / 2.0


@dataclass(frozen=True, kw_only=True)
class ConstantValue:
    """A constant drop fraction (SET's original schedule)."""

    value: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"drop fraction must be in [0, 1], got {self.value}")

    def __call__(self, step: int) -> float:
        return self.value
