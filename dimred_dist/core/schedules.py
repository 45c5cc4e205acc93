"""Schedules as small value types: when topology updates happen and how much they change.

All schedules are frozen dataclasses of plain numbers, evaluated with a step count; they hold no
state, so resuming only needs the step. The first four are building blocks; :class:`Schedule` and
its kinds (``one_shot``, ``periodic``, ``cubic``, ``imp``) are the recipe's ``schedule`` section.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from dimred_dist.core.typecheck import brief, check_fields


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


def default_end_step(total_steps: int, end_fraction: float) -> int:
    """The step at which topology updates stop: ``end_fraction`` of training, at least 1."""
    return max(1, int(math.floor(total_steps * end_fraction)))


# ---- schedules as recipe values ------------------------------------------------------------
# A recipe's ``schedule`` section says *when* the topology changes and *to what density*; the method
# says *which* entries (its scores). Any score combines with any schedule. Each kind is a frozen
# dataclass of plain values; everything that depends on the length of training is evaluated with
# ``total_steps`` (the planned number of optimizer steps).


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Base of the recipe's schedule kinds.

    Class attributes:
        kind: The name in a recipe (``schedule: {kind: ...}``).
        regrows: True if an update drops and regrows entries at constant density (dynamic sparse
            training); False if it only removes entries until the target density of the step.
    """

    kind: ClassVar[str] = ""
    regrows: ClassVar[bool] = False

    def check(self, total_steps: int, density: float) -> None:
        """Raise ``ValueError`` if the schedule cannot run for ``total_steps`` or reach ``density``."""
        self.check_density(density)

    def check_density(self, density: float) -> None:
        """Raise ``ValueError`` if the schedule cannot reach the recipe's ``density`` (checked when the
        recipe is read, before the length of training is known)."""

    def initial_density(self, density: float) -> float:
        """Density of the topology chosen at initialization (``density`` is the recipe's target)."""
        return density

    def is_update_step(self, step: int, total_steps: int) -> bool:
        """Whether the topology may change before optimizer step ``step`` (0-based)."""
        return False

    def density(self, step: int, total_steps: int, density: float) -> float:
        """Target density after the update before step ``step`` (pruning schedules)."""
        return density

    @property
    def changes_topology(self) -> bool:
        """Whether any update can happen after initialization."""
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True, kw_only=True)
class OneShotSchedule(Schedule):
    """Choose the topology once: at initialization (``at_step: 0``, pruning at initialization), or
    before optimizer step ``at_step`` of a model that trained densely until then.

    Attributes:
        at_step: Optimizer step before which the topology is chosen; 0 means at initialization.
    """

    kind: ClassVar[str] = "one_shot"
    at_step: int = 0

    def __post_init__(self) -> None:
        _check_int("schedule.at_step", self.at_step, 0)

    def check(self, total_steps: int, density: float) -> None:
        if self.at_step > 0 and total_steps and self.at_step >= total_steps:
            raise ValueError(f"schedule.at_step {self.at_step} is not before the end of training ({total_steps} steps)")

    def initial_density(self, density: float) -> float:
        return density if self.at_step == 0 else 1.0

    def is_update_step(self, step: int, total_steps: int) -> bool:
        return self.at_step > 0 and step == self.at_step

    @property
    def changes_topology(self) -> bool:
        return self.at_step > 0


@dataclass(frozen=True, kw_only=True)
class PeriodicSchedule(Schedule):
    """Dynamic sparse training (SET, RigL): every ``interval`` steps drop a fraction of each layer's
    active entries and regrow as many; the density stays at the target.

    Attributes:
        interval: Optimizer steps between two updates (Delta T).
        drop_fraction: Fraction of each layer's active entries dropped at the first update (alpha).
            The count is truncated, ``int(drop_fraction * n_active)``, as in RigL's code.
        end_fraction: Updates stop after this fraction of the planned steps (T_end / T).
        decay: ``cosine`` (RigL: the drop fraction decays to 0 at T_end), ``linear`` (SpIEL:
            ``drop_fraction * (1 - t / T_end)``) or ``constant`` (SET).
        skip_step: No optimizer step on an update step (RigL's Algorithm 1 and code: the step's
            gradient only scores the growth). ``false`` lets the optimizer step as well.
        offset: Updates happen at steps ``offset + k * interval`` (k >= 0, step 0 never); SpIEL
            selects ``selection_accumulation_steps`` after each reselection period starts.
        first_drop_fraction: The drop fraction of the first update instead of the decayed value
            (SpIEL: 1.0, the random initial set is replaced by the gradient's choice); None: none.
    """

    kind: ClassVar[str] = "periodic"
    regrows: ClassVar[bool] = True
    interval: int = 100
    drop_fraction: float = 0.3
    end_fraction: float = 0.75
    decay: str = "cosine"
    skip_step: bool = True
    offset: int = 0
    first_drop_fraction: float | None = None

    def __post_init__(self) -> None:
        _check_int("schedule.interval", self.interval, 1)
        _check_fraction("schedule.drop_fraction", self.drop_fraction, closed=True)
        _check_fraction("schedule.end_fraction", self.end_fraction)
        if self.decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule.decay must be 'cosine', 'linear' or 'constant', got {self.decay!r}")
        _check_bool("schedule.skip_step", self.skip_step)
        _check_int("schedule.offset", self.offset, 0)
        if self.first_drop_fraction is not None:
            _check_fraction("schedule.first_drop_fraction", self.first_drop_fraction, closed=True)

    def check(self, total_steps: int, density: float) -> None:
        if total_steps < 1:
            raise ValueError(f"a periodic schedule needs the planned number of steps (total_steps), got {total_steps}")

    def _end(self, total_steps: int) -> int:
        return default_end_step(total_steps, self.end_fraction)

    def first_update(self, total_steps: int) -> int | None:
        """The first update step, or None if there is none before T_end."""
        step = self.offset if self.offset > 0 else self.interval
        return step if step < self._end(total_steps) else None

    def is_update_step(self, step: int, total_steps: int) -> bool:
        if step < self.offset or step >= self._end(total_steps):
            return False
        shifted = PeriodicUpdate(interval=self.interval, start=0, end=self._end(total_steps) - self.offset)
        if step == self.offset:
            return step > 0
        return shifted.is_update_step(step - self.offset)

    def drop(self, step: int, total_steps: int) -> float:
        """The drop fraction of the update before ``step``."""
        if self.first_drop_fraction is not None and step == self.first_update(total_steps):
            return self.first_drop_fraction
        if self.decay == "constant":
            return ConstantValue(value=self.drop_fraction)(step)
        end = self._end(total_steps)
        if self.decay == "linear":
            return self.drop_fraction * max(0.0, 1.0 - step / end)
        return CosineDecay(value=self.drop_fraction, end=end)(step)


@dataclass(frozen=True, kw_only=True)
class CubicSchedule(Schedule):
    """Gradual pruning with Zhu & Gupta's cubic density schedule (2017, "To prune, or not to prune").

    Between ``t0 = start_fraction * T`` and ``t_end = end_fraction * T`` the sparsity follows
    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0)) ** 3``, updated every ``interval`` steps
    and once more at ``t_end`` (so the target is always reached), then held.

    Attributes:
        interval: Optimizer steps between two pruning updates (Delta t).
        start_fraction: Pruning starts at this fraction of the planned steps (t0).
        end_fraction: The target sparsity is reached at this fraction of the planned steps.
        initial_sparsity: Sparsity s_i at t0 (chosen at initialization when t0 is 0).
    """

    kind: ClassVar[str] = "cubic"
    interval: int = 100
    start_fraction: float = 0.0
    end_fraction: float = 0.75
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        _check_int("schedule.interval", self.interval, 1)
        _check_fraction("schedule.start_fraction", self.start_fraction, closed=True)
        _check_fraction("schedule.end_fraction", self.end_fraction)
        if not self.start_fraction < self.end_fraction:
            raise ValueError(
                f"schedule.start_fraction {self.start_fraction} must be below schedule.end_fraction {self.end_fraction}"
            )
        if isinstance(self.initial_sparsity, bool) or not 0.0 <= self.initial_sparsity < 1.0:
            raise ValueError(f"schedule.initial_sparsity must be in [0, 1), got {self.initial_sparsity!r}")

    def _span(self, total_steps: int) -> tuple[int, int]:
        t0 = int(math.floor(total_steps * self.start_fraction))
        return t0, max(t0 + 1, default_end_step(total_steps, self.end_fraction))

    def check(self, total_steps: int, density: float) -> None:
        if total_steps < 1:
            raise ValueError(f"a cubic schedule needs the planned number of steps (total_steps), got {total_steps}")
        self.check_density(density)

    def check_density(self, density: float) -> None:
        if 1.0 - self.initial_sparsity < density:
            raise ValueError(
                f"schedule.initial_sparsity {self.initial_sparsity} is above the recipe's sparsity "
                f"{1.0 - density:.6g}: the density would end above its start"
            )

    def initial_density(self, density: float) -> float:
        return 1.0 - self.initial_sparsity

    def is_update_step(self, step: int, total_steps: int) -> bool:
        t0, t_end = self._span(total_steps)
        return step > 0 and t0 < step <= t_end and ((step - t0) % self.interval == 0 or step == t_end)

    def density(self, step: int, total_steps: int, density: float) -> float:
        t0, t_end = self._span(total_steps)
        p = min(1.0, max(0.0, (step - t0) / (t_end - t0)))
        s_f = 1.0 - density
        return 1.0 - (s_f + (self.initial_sparsity - s_f) * (1.0 - p) ** 3)


@dataclass(frozen=True, kw_only=True)
class IMPSchedule(Schedule):
    """Iterative magnitude pruning rounds (Frankle & Carbin, 2019): train, prune, rewind, repeat.

    Training is split into ``rounds + 1`` segments of ``round_steps`` steps (the last one runs to the
    end of training). Before the first step of segment ``r`` (``r = 1 .. rounds``) the method removes
    ``prune_fraction`` of the remaining entries by its scores, so the density after ``r`` rounds is
    ``(1 - prune_fraction) ** r`` and after the last one the recipe's density. That step is not
    applied (its gradient belongs to the weights before rewinding) and the optimizer restarts.

    Attributes:
        rounds: Number of pruning rounds R.
        prune_fraction: Fraction of the remaining entries pruned per round; default: the one that
            reaches the recipe's sparsity in ``rounds`` rounds, ``1 - density ** (1 / rounds)``.
        round_steps: Optimizer steps per segment; 0: ``total_steps // (rounds + 1)``.
        rewind: ``weights``: rewind every trainable weight to its value after ``rewind_step`` steps
            and the LR schedule to that step (Frankle et al., 2020); ``lr``: keep the weights and
            rewind only the LR schedule (Renda et al., 2020); ``none``: keep both (fine-tuning).
        rewind_step: The step k rewound to; it must lie inside the first segment.
    """

    kind: ClassVar[str] = "imp"
    rounds: int = 1
    prune_fraction: float | None = None
    round_steps: int = 0
    rewind: str = "weights"
    rewind_step: int = 0

    def __post_init__(self) -> None:
        _check_int("schedule.rounds", self.rounds, 1)
        if self.prune_fraction is not None:
            _check_fraction("schedule.prune_fraction", self.prune_fraction)
            if self.prune_fraction >= 1.0:
                raise ValueError(f"schedule.prune_fraction must be below 1, got {self.prune_fraction}")
        _check_int("schedule.round_steps", self.round_steps, 0)
        if self.rewind not in ("weights", "lr", "none"):
            raise ValueError(f"schedule.rewind must be 'weights', 'lr' or 'none', got {self.rewind!r}")
        _check_int("schedule.rewind_step", self.rewind_step, 0)

    def segment(self, total_steps: int) -> int:
        """Steps per training segment."""
        return self.round_steps or total_steps // (self.rounds + 1)

    def fraction(self, density: float) -> float:
        """The fraction pruned per round."""
        return self.prune_fraction if self.prune_fraction is not None else 1.0 - density ** (1.0 / self.rounds)

    def check(self, total_steps: int, density: float) -> None:
        seg = self.segment(total_steps)
        if seg < 1 or self.rounds * seg >= max(total_steps, 1):
            raise ValueError(
                f"{self.rounds} IMP rounds of {seg} steps do not fit in {total_steps} planned steps "
                "(training needs rounds + 1 segments)"
            )
        if self.rewind_step >= seg:
            raise ValueError(f"schedule.rewind_step {self.rewind_step} is beyond the first round ({seg} steps)")
        reached = (1.0 - self.fraction(density)) ** self.rounds
        if abs(reached - density) > 1e-6:
            raise ValueError(
                f"{self.rounds} rounds pruning {self.fraction(density)} each reach density {reached:.6g}, not the "
                f"recipe's {density:.6g} (sparsity {1.0 - density:.6g}); change schedule.rounds, "
                "schedule.prune_fraction or the sparsity"
            )

    def initial_density(self, density: float) -> float:
        return 1.0

    def round_of_update(self, step: int, total_steps: int) -> int:
        """The round whose pruning runs before ``step`` (1 .. rounds), or 0 if none does."""
        seg = self.segment(total_steps)
        if step <= 0 or step % seg:
            return 0
        r = step // seg
        return r if r <= self.rounds else 0

    def is_update_step(self, step: int, total_steps: int) -> bool:
        return self.round_of_update(step, total_steps) > 0

    def density(self, step: int, total_steps: int, density: float) -> float:
        r = self.round_of_update(step, total_steps)
        return density if r == self.rounds else (1.0 - self.fraction(density)) ** r


#: Schedule kinds by recipe name.
SCHEDULES: dict[str, type[Schedule]] = {
    cls.kind: cls for cls in (OneShotSchedule, PeriodicSchedule, CubicSchedule, IMPSchedule)
}


def schedule_from_dict(data: Any, where: str = "schedule") -> Schedule:
    """A schedule from its recipe mapping (``kind`` plus the kind's fields), with errors naming the value."""
    if isinstance(data, Schedule):
        return data
    if not isinstance(data, dict) or "kind" not in data:
        raise TypeError(f"{where}: expected a mapping with a `kind` ({', '.join(SCHEDULES)}), got {brief(data)}")
    fields = dict(data)
    kind = fields.pop("kind")
    if kind not in SCHEDULES:
        raise ValueError(f"{where}: unknown schedule kind {kind!r}; known: {', '.join(SCHEDULES)}")
    cls = SCHEDULES[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for kind {kind!r}; valid keys: {sorted(names)}")
    out = cls(**fields)
    check_fields(out, "schedule")
    return out


def _check_int(label: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")


def _check_fraction(label: str, value: Any, *, closed: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if not ok or not ((0.0 <= value <= 1.0) if closed else (0.0 < value <= 1.0)):
        raise ValueError(f"{label} must be in {'[0, 1]' if closed else '(0, 1]'}, got {value!r}")


def _check_bool(label: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{label} must be true or false, got {value!r}")
