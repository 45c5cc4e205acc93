"""Layer-wise sparsity distributions: how an overall density is split across the managed layers.

* ``uniform``: every layer gets the same density.
* ``erk``: Erdos-Renyi-Kernel (Evci et al., 2020, "Rigging the Lottery"): a layer's density is
  proportional to ``sum(shape) / prod(shape)``; a layer that would exceed density 1 is kept dense
  and the rest is rescaled, until no layer exceeds 1.
* ``global``: no per-layer budget; one top-k across all layers decides (the returned densities are
  only the overall target, per layer).

Keep counts are ``round(density * numel)`` per layer, so the selected entries are exact integers
that every rank computes identically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

DISTRIBUTIONS = ("uniform", "erk", "global")


def _check(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")


def uniform_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    _check(density)
    return {name: density for name in shapes}


def erk_densities(
    shapes: Mapping[str, Sequence[int]], density: float, *, power_scale: float = 1.0
) -> dict[str, float]:
    """ERK densities whose parameter-weighted mean equals ``density`` exactly (before rounding)."""
    _check(density)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: (sum(s) / math.prod(s)) ** power_scale for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(numel.values()) - sum(numel[n] for n in dense)
        denom = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        if denom <= 0:
            return {n: 1.0 for n in shapes}
        eps = budget / denom
        over = {n for n in shapes if n not in dense and eps * raw[n] > 1.0}
        if not over:
            return {n: (1.0 if n in dense else eps * raw[n]) for n in shapes}
        dense |= over


def layer_densities(distribution: str, shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Per-layer target densities for ``distribution`` (``global`` returns the overall density per layer)."""
    if distribution == "erk":
        return erk_densities(shapes, density)
    if distribution in ("uniform", "global"):
        return uniform_densities(shapes, density)
    raise ValueError(f"unknown sparsity distribution {distribution!r}; known: {', '.join(DISTRIBUTIONS)}")


def keep_counts(densities: Mapping[str, float], shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Exact per-layer keep counts ``round(density * numel)``."""
    return {n: int(round(densities[n] * math.prod(shapes[n]))) for n in shapes}


def check_no_empty_layers(counts: Mapping[str, int], distribution: str, density: float, *, allow: bool,
                          prunes: bool = True) -> None:
    """Raise ``ValueError`` naming the layers whose keep count rounds to 0, unless ``allow`` (the recipe's
    ``allow_empty_layers``). A ``global`` budget has no per-layer count, and a freezing method
    (``prunes=False``) leaves a layer without TRAIN entries frozen, not removed: neither is checked."""
    if allow or distribution == "global" or not prunes:
        return
    empty = [n for n, c in counts.items() if c == 0]
    if empty:
        raise ValueError(
            f"sparsity {1 - density:.6g} with the {distribution!r} distribution keeps 0 entries of {len(empty)} "
            f"layer(s) ({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}): they would be removed whole. "
            "Lower the sparsity, use distribution: erk, or set allow_empty_layers: true"
        )
