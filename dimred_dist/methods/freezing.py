"""Freezing at initialization: choose the entries that train, hold the others at their initial value.

* ``freezenet``: Wimmer et al., 2021, "FreezeNet: Full Performance by Reduced Storage Costs": SNIP's
  saliency ``|w * g|`` (``g`` summed over ``batches`` probe batches, one in the paper) chooses the
  TRAIN entries with one global budget (``distribution: global`` in the shipped recipe); every other
  managed entry FREEZEs at its initial value, so the forward pass keeps the whole network while the
  trained dimension shrinks. ``prune_fraction`` (this project's option, 0 by default: the paper
  freezes and prunes nothing) sets the lowest-saliency fraction of the managed entries to PRUNE
  instead. Biases and norms are not managed by default and train, as in the paper.
* ``fish``: Sung et al., 2021, "Training Neural Networks with Fixed Sparse Masks": the diagonal
  Fisher information, the sum over samples of the squared per-sample gradient of the loss with the
  true labels, at the pretrained weights; its top entries (one global budget in the paper) TRAIN,
  the rest FREEZE at their pretrained value. The reference code scores 1024 samples one at a time;
  here ``batches`` probe batches are split into single samples (``per_sample: false`` squares the
  batch gradients instead, cheaper and coarser). The probe runs in eval mode (dropout off).

Use these on a pretrained model for sparse fine-tuning (FreezeNet on a randomly initialized one
trains from scratch); ``random_freeze`` is the random (SHiRA-style) choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dimred_dist.core.registry import register_method
from dimred_dist.core.state import ElementState
from dimred_dist.distributed.probe import split_batch
from dimred_dist.methods.base import MethodContext
from dimred_dist.methods.pai import SNIP, ProbeConfig, _Probed


@dataclass(kw_only=True)
class FreezeNetConfig(ProbeConfig):
    """Attributes:
        prune_fraction: Fraction of the managed entries, the lowest-saliency ones, that PRUNE instead
            of FREEZE (at most the recipe's sparsity).
    """

    prune_fraction: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        p = self.prune_fraction
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"prune_fraction must be in [0, 1), got {p!r}")


def _check_at_initialization(method) -> None:
    method.require_no_schedule(f"{method.method_name} chooses its TRAIN entries once, before step 0; give it no "
                               f"schedule (got {method.schedule.to_dict()})")


@register_method("freezenet")
class FreezeNet(SNIP):
    config_cls = FreezeNetConfig
    init_state = ElementState.FREEZE

    def setup(self, ctx: MethodContext) -> None:
        super().setup(ctx)
        _check_at_initialization(self)
        if self.config.prune_fraction > self.recipe.sparsity:
            raise ValueError(
                f"freezenet: prune_fraction {self.config.prune_fraction} is above the recipe's sparsity "
                f"{self.recipe.sparsity} (the fraction that does not train)"
            )

    def initialize(self, ctx: MethodContext) -> None:
        if self.recipe.sparsity == 0.0:
            return
        scores = {name: self.init_scores(v, ctx) for name, v in ctx.views.items()}
        if self.config.prune_fraction > 0.0:  # the same scores: the TRAIN set lies inside the kept set
            ctx.apply(ctx.select(scores, ctx.budgets(1.0 - self.config.prune_fraction)), ElementState.PRUNE)
        ctx.apply(ctx.select(scores, ctx.budgets(self.recipe.density)), ElementState.FREEZE)
        self.probe_scores = None


@dataclass(kw_only=True)
class FishConfig(ProbeConfig):
    """Attributes:
        batches: Probe batches (their samples are the Fisher's samples; the paper: 1024 samples).
        per_sample: Square each sample's gradient (the paper); false: square each batch's gradient.
    """

    batches: int = 64
    per_sample: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.per_sample, bool):
            raise ValueError(f"per_sample must be true or false, got {self.per_sample!r}")


@register_method("fish")
class FISH(_Probed):
    config_cls = FishConfig
    init_state = ElementState.FREEZE
    needs_data: ClassVar[bool] = True
    needs_pretrained: ClassVar[bool] = True

    def setup(self, ctx: MethodContext) -> None:
        super().setup(ctx)
        _check_at_initialization(self)

    def probe(self, ctx: MethodContext, prober) -> None:
        names = list(ctx.views)
        batches = prober.batches(self.config.batches, "fish")
        samples = [s for b in batches for s in split_batch(b)] if self.config.per_sample else list(batches)
        fisher: dict[str, torch.Tensor] = {}
        for s in prober.rounds(len(samples), "fish"):
            g = prober.gradients(names, [samples[s]])
            for n in names:
                fisher[n] = g[n].square() if n not in fisher else fisher[n].add_(g[n].square())
        prober.check_nonzero(fisher, "fish")
        self.probe_scores = fisher
