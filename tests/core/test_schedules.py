"""Schedules: stateless value types evaluated at a step."""

from __future__ import annotations

import dataclasses
import math

import pytest

import dimred_dist
from dimred_dist.core.schedules import (
    ConstantValue,
    CosineDecay,
    CubicSchedule,
    IMPSchedule,
    OneShot,
    OneShotSchedule,
    PeriodicSchedule,
    PeriodicUpdate,
    default_end_step,
    schedule_from_dict,
)


def test_one_shot():
    s = OneShot(at_step=3)
    assert [t for t in range(10) if s.is_update_step(t)] == [3]
    assert [t for t in range(5) if OneShot().is_update_step(t)] == [0]
    with pytest.raises(ValueError, match="at_step must be >= 0"):
        OneShot(at_step=-1)


def test_periodic_update_hand_worked():
    assert [t for t in range(30) if PeriodicUpdate(interval=3, end=10).is_update_step(t)] == [3, 6, 9]
    assert [t for t in range(30) if PeriodicUpdate(interval=4, start=5, end=17).is_update_step(t)] == [8, 12, 16]
    # end is exclusive, step 0 never updates
    assert [t for t in range(30) if PeriodicUpdate(interval=1, start=0, end=3).is_update_step(t)] == [1, 2]
    assert not any(PeriodicUpdate(interval=5, end=5).is_update_step(t) for t in range(30))


@pytest.mark.parametrize("kw, match", [
    (dict(interval=0, end=10), "interval must be >= 1"),
    (dict(interval=2, start=5, end=4), "end 4 is before start 5"),
])
def test_periodic_update_rejects(kw, match):
    with pytest.raises(ValueError, match=match):
        PeriodicUpdate(**kw)


def test_cosine_decay_values():
    c = CosineDecay(value=0.3, end=100)
    assert c(0) == pytest.approx(0.3)
    assert c(50) == pytest.approx(0.15)
    assert c(25) == pytest.approx(0.3 * (1 + math.cos(math.pi / 4)) / 2)
    assert c(100) == 0.0 and c(1000) == 0.0
    values = [c(t) for t in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("kw, match", [
    (dict(value=1.1, end=10), "drop fraction must be in"),
    (dict(value=-0.1, end=10), "drop fraction must be in"),
    (dict(value=0.3, end=0), "end must be >= 1"),
])
def test_cosine_decay_rejects(kw, match):
    with pytest.raises(ValueError, match=match):
        CosineDecay(**kw)


def test_constant_value():
    assert {ConstantValue(value=0.2)(t) for t in (0, 1, 10**9)} == {0.2}
    with pytest.raises(ValueError, match="drop fraction must be in"):
        ConstantValue(value=2.0)


def test_schedules_are_frozen_keyword_only_values():
    s = PeriodicUpdate(interval=2, end=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.interval = 3
    assert s == PeriodicUpdate(interval=2, start=1, end=8)  # value semantics: resuming needs only the step
    with pytest.raises(TypeError):
        PeriodicUpdate(2, 1, 8)


@pytest.mark.parametrize("total, frac, expected", [(1000, 0.75, 750), (10, 0.75, 7), (1, 0.5, 1), (0, 0.75, 1)])
def test_default_end_step(total, frac, expected):
    assert default_end_step(total, frac) == expected


# ---- schedules as recipe values ------------------------------------------------------------------


def test_cubic_schedule_follows_zhu_and_gupta():
    """T = 100, t0 = 0, t_end = 50, every 10 steps, s_i = 0 -> s_f = 0.9:
    s_t = 0.9 + (0 - 0.9) * (1 - t / 50) ** 3, e.g. s_10 = 0.9 - 0.9 * 0.8 ** 3 = 0.4392."""
    s = CubicSchedule(interval=10, end_fraction=0.5)
    assert [t for t in range(101) if s.is_update_step(t, 100)] == [10, 20, 30, 40, 50]
    assert s.initial_density(0.1) == 1.0
    assert 1 - s.density(10, 100, 0.1) == pytest.approx(0.4392)
    assert 1 - s.density(30, 100, 0.1) == pytest.approx(0.9 - 0.9 * 0.4 ** 3)
    assert s.density(50, 100, 0.1) == pytest.approx(0.1) and s.density(90, 100, 0.1) == pytest.approx(0.1)
    # t_end is always an update step, so the target is reached even when the interval does not divide the span
    odd = CubicSchedule(interval=15, end_fraction=0.5)
    assert [t for t in range(101) if odd.is_update_step(t, 100)] == [15, 30, 45, 50]
    start = CubicSchedule(interval=10, start_fraction=0.2, end_fraction=0.6, initial_sparsity=0.5)
    assert [t for t in range(101) if start.is_update_step(t, 100)] == [30, 40, 50, 60]
    assert start.initial_density(0.1) == 0.5
    with pytest.raises(ValueError, match="initial_sparsity 0.5 is above the recipe's sparsity 0.3"):
        start.check(100, 0.7)
    # a recipe whose density schedule would end above its start is refused when it is read
    with pytest.raises(ValueError, match="initial_sparsity 0.95 is above the recipe's sparsity 0.9: the density "
                                         "would end above its start"):
        dimred_dist.load_recipe({"method": "magnitude", "sparsity": 0.9,
                                 "schedule": {"kind": "cubic", "initial_sparsity": 0.95}})
    with pytest.raises(ValueError, match="start_fraction 0.6 must be below schedule.end_fraction 0.5"):
        CubicSchedule(start_fraction=0.6, end_fraction=0.5)


def test_imp_schedule_rounds_and_densities():
    """3 rounds to density 0.125 prune 1 - 0.125 ** (1/3) = 0.5 each, at the ends of 25-step segments."""
    s = IMPSchedule(rounds=3)
    assert s.fraction(0.125) == pytest.approx(0.5)
    assert [t for t in range(101) if s.is_update_step(t, 100)] == [25, 50, 75]
    assert [s.density(t, 100, 0.125) for t in (25, 50, 75)] == pytest.approx([0.5, 0.25, 0.125])
    assert [s.round_of_update(t, 100) for t in (24, 25, 50, 75, 100)] == [0, 1, 2, 3, 0]
    assert s.initial_density(0.125) == 1.0
    s.check(100, 0.125)
    fixed = IMPSchedule(rounds=2, prune_fraction=0.2, round_steps=10, rewind="lr", rewind_step=3)
    fixed.check(100, 0.64)
    assert [t for t in range(101) if fixed.is_update_step(t, 100)] == [10, 20]


@pytest.mark.parametrize("kw, total, density, match", [
    (dict(rounds=2, prune_fraction=0.2), 90, 0.1, r"2 rounds pruning 0.2 each reach density 0.64, not the recipe"),
    (dict(rounds=3, rewind_step=25), 100, 0.125, "rewind_step 25 is beyond the first round"),
    (dict(rounds=4, round_steps=30), 100, 0.5, "4 IMP rounds of 30 steps do not fit in 100 planned steps"),
    (dict(rounds=3), 3, 0.5, "do not fit"),
])
def test_imp_schedule_refuses_what_cannot_work(kw, total, density, match):
    with pytest.raises(ValueError, match=match):
        IMPSchedule(**kw).check(total, density)


def test_one_shot_and_periodic_schedules():
    assert not OneShotSchedule().changes_topology and OneShotSchedule().initial_density(0.2) == 0.2
    later = OneShotSchedule(at_step=5)
    assert later.initial_density(0.2) == 1.0 and [t for t in range(20) if later.is_update_step(t, 20)] == [5]
    with pytest.raises(ValueError, match="at_step 20 is not before the end of training"):
        later.__class__(at_step=20).check(20, 0.5)
    p = PeriodicSchedule(interval=3, drop_fraction=0.4, end_fraction=0.5)
    assert [t for t in range(30) if p.is_update_step(t, 30)] == [3, 6, 9, 12]
    assert p.drop(0, 30) == pytest.approx(0.4) and p.drop(15, 30) == 0.0
    assert PeriodicSchedule(decay="constant").drop(10**6, 10) == 0.3


@pytest.mark.parametrize("data, err, match", [
    ({"kind": "gradual"}, ValueError, "unknown schedule kind 'gradual'; known: one_shot, periodic, cubic, imp"),
    ({"kind": "periodic", "every": 3}, ValueError, r"unknown key\(s\) \['every'\] for kind 'periodic'"),
    ({"interval": 3}, TypeError, "expected a mapping with a `kind`"),
    ({"kind": "periodic", "interval": 0}, ValueError, "schedule.interval must be an integer >= 1, got 0"),
    ({"kind": "periodic", "skip_step": "yes"}, ValueError, "schedule.skip_step must be true or false"),
    ({"kind": "imp", "rewind": "both"}, ValueError, "schedule.rewind must be 'weights', 'lr' or 'none'"),
    ({"kind": "imp", "prune_fraction": 1.0}, ValueError, "prune_fraction must be below 1"),
])
def test_schedule_values_are_validated(data, err, match):
    with pytest.raises(err, match=match):
        schedule_from_dict(data)


def test_periodic_offset_linear_decay_and_first_drop_fraction():
    """SpIEL's schedule: updates at offset + k * interval, drop 1.0 first, then 0.2 * (1 - t / T_end)."""
    from dimred_dist.core.schedules import schedule_from_dict

    s = schedule_from_dict({"kind": "periodic", "interval": 20, "offset": 5, "drop_fraction": 0.2, "decay": "linear",
                            "end_fraction": 1.0, "first_drop_fraction": 1.0})
    assert [t for t in range(100) if s.is_update_step(t, 80)] == [5, 25, 45, 65]
    assert [s.drop(t, 80) for t in (5, 25, 45, 65)] == pytest.approx([1.0, 0.2 * 55 / 80, 0.2 * 35 / 80, 0.2 * 15 / 80])
    plain = schedule_from_dict({"kind": "periodic", "interval": 10, "end_fraction": 0.75})
    assert [t for t in range(100) if plain.is_update_step(t, 80)] == [10, 20, 30, 40, 50], "offset 0: as before"
    late = schedule_from_dict({"kind": "periodic", "interval": 10, "offset": 70, "end_fraction": 0.75})
    assert not any(late.is_update_step(t, 80) for t in range(100)), "an offset past T_end: no update"
    with pytest.raises(ValueError, match="schedule.decay must be 'cosine', 'linear' or 'constant'"):
        schedule_from_dict({"kind": "periodic", "decay": "exp"})
    with pytest.raises(ValueError, match="schedule.offset must be an integer >= 0"):
        schedule_from_dict({"kind": "periodic", "offset": -1})
    with pytest.raises(ValueError, match=r"schedule.first_drop_fraction must be in \[0, 1\]"):
        schedule_from_dict({"kind": "periodic", "first_drop_fraction": 1.5})
