"""Rewinding between the rounds of iterative pruning (the ``imp`` schedule).

* Weight rewinding (Frankle et al., 2020, "Linear Mode Connectivity and the Lottery Ticket
  Hypothesis"): before optimizer step k every rank copies the fp32 masters of its own range of every
  trainable parameter (managed or not: biases and norms are rewound too). The snapshot is sharded
  like the masters (4 bytes per owned entry) and checkpointed by global range, so it reshards.
* Learning-rate rewinding (Renda et al., 2020, "Comparing Rewinding and Fine-tuning in Neural
  Network Pruning"): the weights stay; the LR schedule returns to its state of step k.

At the end of a round (the update before step ``t = r * round_steps``) the method prunes; then step
``t`` is not applied (its gradient belongs to the weights before rewinding), the optimizer restarts
(moments and step counts from zero), after step ``t`` the masters are rewound (pruned entries stay 0),
and step ``t + 1``, the first step of the next round, uses the learning rate of step k: the round
retrains on the schedule from step k, as in Frankle et al.'s rewinding.
"""

from __future__ import annotations

from typing import Any

import torch

LR_KEY = "imp_rewind"


class Rewinding:
    """The rewinding state of an ``imp`` schedule (plain data plus the sharded weight snapshot)."""

    def __init__(self, schedule) -> None:
        self.schedule = schedule
        self.snapshot: dict[str, torch.Tensor] = {}
        self.rewind_at = -1  # the step after whose optimizer update the weights are rewound
        self.lr_at = -1  # the step before whose update the LR schedule is restored

    def observe(self, ctx, step: int) -> None:
        s = self.schedule
        if step == s.rewind_step and s.rewind != "none":
            if s.rewind == "weights":
                self.snapshot = {n: v.weight().detach().clone() for n, v in ctx.trainable_views().items()}
            ctx.save_lr_schedule(LR_KEY)
        if step == self.lr_at:
            ctx.restore_lr_schedule(LR_KEY)

    def round_end(self, ctx, step: int) -> None:
        """After the pruning of a round, before step ``step``: skip it, restart, rewind afterwards."""
        ctx.skip_step()
        if self.schedule.rewind == "none":
            return
        ctx.restart_optimizer()
        self.lr_at = step + 1
        if self.schedule.rewind == "weights":
            self.rewind_at = step

    @torch.no_grad()
    def after_step(self, ctx, step: int) -> bool:
        """Rewind the masters the optimizer just wrote; True if any was written."""
        if step != self.rewind_at:
            return False
        wrote = False
        for name, v in ctx.written_views().items():
            snap = self.snapshot.get(name)
            if snap is None:
                continue
            w = v.weight()
            w.copy_(snap)
            if name in ctx.views:
                w.masked_fill_(~ctx.state[name].keep, 0.0)
            wrote = True
        return wrote

    def state_dict(self) -> dict[str, Any]:
        return {"rewind_at": self.rewind_at, "lr_at": self.lr_at, "has_snapshot": bool(self.snapshot)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.rewind_at, self.lr_at = int(sd["rewind_at"]), int(sd["lr_at"])

    def tensor_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"snapshot": self.snapshot} if self.snapshot else {}

    def load_tensor_state(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        unknown = sorted(set(tensors) - {"snapshot"})
        if unknown:
            raise ValueError(f"rewinding keeps no tensor state {unknown}")
        self.snapshot = dict(tensors.get("snapshot", {}))
