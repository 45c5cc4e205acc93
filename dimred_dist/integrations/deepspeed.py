"""Plug a recipe into a DeepSpeed engine.

    freeze_whole_tensors(model, recipe.freeze)           # before the engine: nothing allocated for them
    engine, *_ = deepspeed.initialize(model=model, optimizer=CompactAdamW(trainable(model)), config=ds)
    manager = attach_to_engine(recipe, engine, total_steps=1000)
    ...  engine.backward(loss); engine.step()            # the manager runs inside engine.step()
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from dimred_dist.core.config import Recipe
from dimred_dist.core.targets import freeze_whole_tensors
from dimred_dist.distributed.probe import ProbeData
from dimred_dist.distributed.zero import ZeroAdapter
from dimred_dist.manager import DimRedManager

__all__ = ["attach_to_engine", "freeze_whole_tensors", "trainable"]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (what the client optimizer should be given)."""
    return [p for p in model.parameters() if p.requires_grad]


def attach_to_engine(recipe: Recipe, engine: Any, *, total_steps: int, probe: ProbeData | None = None) -> DimRedManager:
    """Build the manager on a DeepSpeed ZeRO engine, apply the initial topology and hook its step.

    ``probe``: batches (the same on every rank) and a loss for methods that score entries on data
    before training (SNIP, GraSP, FORCE, ...); the scoring passes run through the engine.

    Raises:
        ValueError / TypeError: For ZeRO set-ups the manager cannot serve (offload, BF16_Optimizer,
            round-robin gradients) or a client optimizer that is not mask-aware, before any step.
    """
    manager = DimRedManager(recipe, engine.module, adapter=ZeroAdapter(engine), total_steps=total_steps)
    manager.prepare(probe=probe)
    manager.attach(engine)
    return manager
