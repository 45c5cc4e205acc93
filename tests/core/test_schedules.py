"""Schedules: stateless value types evaluated at a step."""

from __future__ import annotations

import dataclasses
import math

import pytest

from dimred_dist.core.schedules import ConstantValue, CosineDecay, OneShot, PeriodicUpdate
from dimred_dist.methods.base import default_end_step


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
