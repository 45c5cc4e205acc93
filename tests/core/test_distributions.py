"""Layer-wise budgets: uniform, ERK (with redistribution of over-full layers), exact keep counts."""

from __future__ import annotations

import math

import pytest

from dimred_dist.core.distributions import (
    DISTRIBUTIONS,
    erk_densities,
    keep_counts,
    layer_densities,
    uniform_densities,
)

SHAPE_SETS = {
    "mlp": {"fc1": (784, 300), "fc2": (300, 100), "fc3": (100, 10)},
    "conv": {"c1": (16, 3, 3, 3), "c2": (32, 16, 3, 3), "c3": (64, 32, 3, 3), "fc": (10, 64)},
    "tiny_and_huge": {"tiny": (2, 2), "bias_like": (7,), "huge": (512, 512), "emb": (1000, 16)},
    "single": {"w": (33, 17)},
}


def _weighted_mean(d: dict[str, float], shapes: dict) -> float:
    return sum(d[n] * math.prod(s) for n, s in shapes.items()) / sum(math.prod(s) for s in shapes.values())


@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("density", [0.01, 0.1, 0.2, 0.5, 0.8, 0.95, 1.0])
def test_erk_weighted_mean_equals_target_and_caps_at_one(shapes, density):
    d = erk_densities(shapes, density)
    assert set(d) == set(shapes)
    assert _weighted_mean(d, shapes) == pytest.approx(density, rel=1e-12)
    assert all(0.0 < v <= 1.0 for v in d.values())
    # below the cap a layer's density is proportional to sum(shape) / prod(shape)
    ratios = {n: d[n] / (sum(s) / math.prod(s)) for n, s in shapes.items() if d[n] < 1.0}
    if ratios:
        assert max(ratios.values()) == pytest.approx(min(ratios.values()), rel=1e-12)
    # a capped layer is one whose proportional share would have exceeded 1
    for n, s in shapes.items():
        if d[n] == 1.0 and ratios:
            assert next(iter(ratios.values())) * sum(s) / math.prod(s) >= 1.0


def test_erk_hand_worked():
    # raw scores: a = (4+4)/16 = 0.5, b = (8+8)/64 = 0.25; budget 0.5 * 80 = 40 entries
    # eps = 40 / (0.5*16 + 0.25*64) = 40 / 24 = 5/3  ->  a = 5/6, b = 5/12  (16*5/6 + 64*5/12 = 40)
    shapes = {"a": (4, 4), "b": (8, 8)}
    d = erk_densities(shapes, 0.5)
    assert d["a"] == pytest.approx(5 / 6) and d["b"] == pytest.approx(5 / 12)
    assert keep_counts(d, shapes) == {"a": 13, "b": 27}  # 13.33 -> 13, 26.67 -> 27


def test_erk_redistribution_hand_worked():
    # raw: tiny = 4/4 = 1, big = 20/100 = 0.2; budget 0.5 * 104 = 52
    # round 1: eps = 52 / (4 + 20) = 2.1667 -> tiny would be 2.17 > 1: dense (4 entries)
    # round 2: eps = (52 - 4) / 20 = 2.4 -> big = 0.48  (48 of 100)
    shapes = {"tiny": (2, 2), "big": (10, 10)}
    d = erk_densities(shapes, 0.5)
    assert d == {"tiny": 1.0, "big": pytest.approx(0.48)}
    assert keep_counts(d, shapes) == {"tiny": 4, "big": 48}


def test_erk_redistribution_cascades():
    # raw: s1 = 1.5, s2 = 0.5, big = 0.03125; budget 0.067 * 4114 = 275.64
    # round 1: eps = 275.64 / 139 = 1.983 -> s1 = 2.97 capped, s2 = 0.99 not yet
    # round 2: eps = (275.64 - 2) / 136 = 2.012 -> s2 = 1.006 capped too
    # round 3: eps = (275.64 - 18) / 128 = 2.0128 -> big = 0.0629
    shapes = {"s1": (1, 2), "s2": (4, 4), "big": (64, 64)}
    d = erk_densities(shapes, 0.067)
    assert d["s1"] == 1.0 and d["s2"] == 1.0
    assert d["big"] == pytest.approx((0.067 * 4114 - 18) / 4096, rel=1e-12)
    assert _weighted_mean(d, shapes) == pytest.approx(0.067, rel=1e-12)


def test_erk_power_scale_zero_is_uniform():
    shapes = SHAPE_SETS["conv"]
    assert erk_densities(shapes, 0.2, power_scale=0.0) == pytest.approx(uniform_densities(shapes, 0.2))


def test_uniform():
    assert uniform_densities({"a": (3, 3), "b": (10,)}, 0.3) == {"a": 0.3, "b": 0.3}


@pytest.mark.parametrize("density", [0.0, -0.1, 1.01])
@pytest.mark.parametrize("fn", [uniform_densities, erk_densities])
def test_density_outside_unit_interval_raises(fn, density):
    with pytest.raises(ValueError, match="density must be in"):
        fn({"a": (2, 2)}, density)


def test_layer_densities_dispatch():
    shapes = SHAPE_SETS["mlp"]
    assert DISTRIBUTIONS == ("uniform", "erk", "global")
    assert layer_densities("erk", shapes, 0.1) == erk_densities(shapes, 0.1)
    assert layer_densities("uniform", shapes, 0.1) == uniform_densities(shapes, 0.1)
    assert layer_densities("global", shapes, 0.1) == uniform_densities(shapes, 0.1)
    with pytest.raises(ValueError, match="unknown sparsity distribution 'gaussian'; known: uniform, erk, global"):
        layer_densities("gaussian", shapes, 0.1)


def test_keep_counts_hand_worked():
    shapes = {"a": (10,), "b": (3, 3), "c": (7,), "d": (1000,)}
    densities = {"a": 0.3, "b": 0.1, "c": 0.9, "d": 0.0015}
    # 3.0000000000000004 -> 3, 0.9 -> 1, 6.3 -> 6, 1.5 -> 2
    assert keep_counts(densities, shapes) == {"a": 3, "b": 1, "c": 6, "d": 2}
    assert all(isinstance(v, int) for v in keep_counts(densities, shapes).values())


@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_keep_counts_total_close_to_target(shapes, distribution):
    density = 0.1
    counts = keep_counts(layer_densities(distribution, shapes, density), shapes)
    total = sum(math.prod(s) for s in shapes.values())
    assert all(0 <= counts[n] <= math.prod(s) for n, s in shapes.items())
    assert abs(sum(counts.values()) - density * total) <= len(shapes) / 2
