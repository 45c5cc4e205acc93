"""A method's per-element scores for a plain module, in one process: to inspect them, or to compare
them with another implementation.

    scores = dimred_dist.score_entries("snip", model, batches, loss_fn=my_loss)
    scores["fc1.weight"].shape == model.fc1.weight.shape
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from dimred_dist.core.config import Recipe, load_recipe
from dimred_dist.distributed.adapter import ReplicatedAdapter
from dimred_dist.distributed.probe import ProbeData, default_loss
from dimred_dist.distributed.topology import Topology

__all__ = ["score_entries"]


def score_entries(
    recipe: Recipe | str | dict,
    model: nn.Module,
    batches: Sequence[Any] = (),
    *,
    loss_fn: Callable[..., torch.Tensor] = default_loss,
    input_shape: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Scores of every managed entry, shaped like its parameter; the highest are kept.

    Args:
        recipe: A recipe, a recipe file, a mapping, or just a method name (then sparsity 0.5, global
            budget; the sparsity matters only to iterative methods, whose scores are those of their
            last round).
        model: A plain module; its weights are bit-identical afterwards.
        batches: Probe batches for methods that score on data.
        loss_fn: ``loss_fn(model, batch, temperature=1.0)`` (see :func:`dimred_dist.distributed.probe.default_loss`).
        input_shape: One input's shape for data-free methods (SynFlow) without batches.

    Returns:
        ``{parameter name: scores}`` (float32; SynFlow: float64), on the model's device.
    """
    from dimred_dist.manager import DimRedManager

    if isinstance(recipe, str) and not recipe.endswith((".yaml", ".yml")):
        recipe = {"method": recipe, "sparsity": 0.5, "distribution": "global"}
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    mgr = DimRedManager(recipe, model, adapter=ReplicatedAdapter(Topology()))
    mgr.prepare(resuming=True)  # views and state only: nothing is chosen or applied
    method, ctx = mgr.method, mgr.ctx
    if method.needs_probe:
        mgr._probe(ProbeData(list(batches), loss_fn, input_shape))
        found = getattr(method, "round_scores", None) or method.probe_scores
    else:
        found = {n: method.init_scores(v, ctx) for n, v in ctx.views.items()}
    return {n: found[n].reshape(v.shape) for n, v in ctx.views.items()}
