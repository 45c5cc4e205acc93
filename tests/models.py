"""Small deterministic models and recipes shared by the method and manager tests (and their workers)."""

from __future__ import annotations

import torch
import torch.nn as nn

import dimred_dist
from dimred_dist.core.config import Recipe


def mlp(seed: int = 0) -> nn.Module:
    """A trainable 3-layer MLP: 12 -> 16 -> 8 -> 3."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


class Mixed(nn.Module):
    """Layers of very different sizes and kinds (only the parameters matter, there is no forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.conv2 = nn.Conv2d(3, 6, 3)
        self.conv1 = nn.Conv1d(8, 4, 2)
        self.tiny = nn.Linear(3, 2)
        self.big = nn.Linear(96, 64)
        self.norm = nn.LayerNorm(64)


def mixed(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Mixed()


MODELS = {"mlp": mlp, "mixed": mixed}


def recipe(method: str, sparsity: float, distribution: str = "uniform", seed: int = 0, **args) -> Recipe:
    return dimred_dist.load_recipe(
        {"method": method, "sparsity": sparsity, "distribution": distribution, "seed": seed, "args": args}
    )


def masks(manager) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(keep, train) copies per managed parameter."""
    return {ps.name: (ps.keep.clone(), ps.train.clone()) for ps in manager.state}
