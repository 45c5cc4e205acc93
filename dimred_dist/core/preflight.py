"""What a recipe does to a model, checked without training: on a meta-device copy, before anything is built.

:func:`check_recipe_on_model` needs only parameter names and shapes, so a model built from its config
on the ``meta`` device (no memory, no weights) is enough; ``dimred-train`` and ``--check`` run it
during validation.
"""

from __future__ import annotations

import re

import torch.nn as nn

from dimred_dist.core.config import Recipe
from dimred_dist.core.distributions import check_no_empty_layers, keep_counts, layer_densities
from dimred_dist.core.registry import get_method
from dimred_dist.core.state import ElementState
from dimred_dist.core.targets import select_parameters
from dimred_dist.core.typecheck import brief

__all__ = ["check_recipe_on_model"]


def check_recipe_on_model(recipe: Recipe, model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Raise ``ValueError`` if the recipe's patterns or budget do not fit ``model``; return the managed shapes.

    Checked: every ``freeze`` and ``targets.include`` pattern matches some parameter name (a typo would
    otherwise manage or freeze something else, or nothing), some parameter is managed, and no layer's
    budget rounds to zero kept entries (unless ``allow_empty_layers``).
    """
    names = [n for n, _ in model.named_parameters()]
    sample = brief(names[:4])
    frozen: set[str] = set()
    for pattern in recipe.freeze:
        hits = [n for n in names if re.search(pattern, n)]
        if not hits:
            raise ValueError(f"recipe.freeze: pattern {brief(pattern)} matches no parameter; names look like {sample}")
        frozen.update(hits)
    for pattern in recipe.targets.include:
        if not any(re.search(pattern, n) for n in names):
            raise ValueError(f"recipe.targets.include: pattern {brief(pattern)} matches no parameter; names look "
                             f"like {sample}")
    selected = {n: tuple(p.shape) for n, p in select_parameters(model, recipe.targets).items() if n not in frozen}
    if not selected:
        raise ValueError("recipe: every parameter the targets select is frozen whole by `freeze`: nothing to manage")
    counts = keep_counts(layer_densities(recipe.distribution, selected, recipe.density), selected)
    try:
        check_no_empty_layers(counts, recipe.distribution, recipe.density, allow=recipe.allow_empty_layers,
                              prunes=get_method(recipe.method).init_state == ElementState.PRUNE)
    except ValueError as e:
        raise ValueError(f"recipe: {e}") from None
    return selected
