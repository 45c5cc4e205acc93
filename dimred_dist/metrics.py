"""The manager's metrics as one flat dict, computed with one small all-reduce (style habit 10).

Keys (every value a float; ``<layer>`` is a managed parameter's name, in model order):

* ``dimred/density``, ``dimred/density/<layer>``: fraction of entries not pruned (TRAIN or FREEZE);
* ``dimred/train_fraction/<layer>``, ``dimred/fraction/{train,freeze,prune}``: state fractions;
* ``dimred/topology_update_seconds``: seconds this rank spent choosing topologies so far
  (initialization included); ``dimred/topology_updates``: number of topology updates so far;
* ``dimred/churn``, ``dimred/drop_fraction`` (periodic schedules), ``dimred/target_density`` (pruning
  schedules), ``dimred/round`` (IMP) and ``dimred/last_update_step``: churn (fraction of the managed
  entries whose active mask changed) and the method's other values of the *latest* topology update,
  and the 0-based optimizer step before which it ran. Absent until the first update. A log at a step
  without an update repeats the latest values with their step, so a reader can tell they are not
  new; the manager's ``topology_history`` holds every update for plots;
* ``dimred/itop_rate`` (dynamic methods only): in-time over-parameterization rate (Liu et al., 2021,
  "Do We Actually Need Dense Over-Parameterization? In-Time Over-Parameterization in Sparse
  Training"): fraction of managed entries that have been active (not pruned) at least once so far;
* ``dimred/optimizer/{state,dense,reclaimed}_bytes`` (compact optimizers only): optimizer-state
  bytes held, what a dense optimizer of the same kind would hold for the same tensors, and the
  difference, summed over the ranks that share the parameters (one model copy);
  ``dimred/optimizer/rank_{state,dense,reclaimed}_bytes``: the same three on the rank that holds
  the most optimizer state (the per-rank memory that matters);
* ``dimred/nonfinite_steps``, ``dimred/skipped_updates``: steps whose managed gradients held an inf or
  NaN on some rank, and the topology updates skipped because of them (the masks stay as they were);
* ``dimred/optimizer/released_bytes`` / ``rank_released_bytes`` (compact optimizers, from the first
  topology update on): optimizer-state bytes the latest update gave back, summed over ranks and the
  most on one rank (negative where it took more: regrowth into a denser layer).
"""

from __future__ import annotations

from typing import Any

import torch

from dimred_dist.core.bits import count_bits
from dimred_dist.core.state import DimRedState
from dimred_dist.distributed.collectives import Collectives
from dimred_dist.optim.compact import CompactOptimizer


class EverActive:
    """Per parameter, a bit-packed local mask of the entries that have been kept at least once.

    Updated by the manager after every topology change; the local counts are cached there so a
    metrics call only sums them across ranks.
    """

    def __init__(self, state: DimRedState) -> None:
        self.bits = {ps.name: ps.keep_bits.clone() for ps in state}
        self.counts = {name: count_bits(b) for name, b in self.bits.items()}

    def update(self, state: DimRedState) -> None:
        """Add the entries kept now."""
        for ps in state:
            self.bits[ps.name] |= ps.keep_bits.to(self.bits[ps.name].device)
        self.recount()

    def recount(self) -> None:
        """Refresh the cached counts after :attr:`bits` changed."""
        self.counts = {name: count_bits(b) for name, b in self.bits.items()}


def optimizer_bytes(optimizer: Any) -> tuple[int, int] | None:
    """(state bytes held, dense-equivalent bytes) of a compact optimizer on this rank, else None.

    Dense-equivalent: one moment per entry of every tensor the optimizer updates, for each of its
    ``moment_names``, in the tensor's dtype (8 bytes per fp32 entry for AdamW). Under ZeRO-3
    DeepSpeed lists the flat tensors in the optimizer's groups only during a step, so tensors that
    already have state are counted too.
    """
    if not isinstance(optimizer, CompactOptimizer):
        return None
    tensors = {id(p): p for g in optimizer.param_groups for p in g["params"]}
    tensors.update({id(p): p for p in optimizer.state})
    per_entry = len(optimizer.moment_names)
    dense = sum(p.numel() * p.element_size() * per_entry for p in tensors.values())
    return optimizer.state_bytes(), dense


def compute_metrics(
    state: DimRedState,
    names: list[str],
    coll: Collectives,
    *,
    ever: EverActive | None,
    optimizer: Any,
    update_seconds: float,
    history: list[dict[str, float]],
) -> dict[str, float]:
    """The flat metrics dict (see the module docstring); one all-reduce of a small int64 vector."""
    rows = []
    for n in names:
        c = state[n].counts()
        rows += [c[k] for k in sorted(c)] + [ever.counts[n] if ever is not None else 0]
    opt = optimizer_bytes(optimizer)
    per_rank = torch.zeros(2 * coll.world_size, dtype=torch.int64)  # this rank's slot only: sums become a gather
    if opt is not None:
        per_rank[2 * coll.rank], per_rank[2 * coll.rank + 1] = opt
    total = coll.all_reduce_sum(torch.cat([torch.tensor(rows, dtype=torch.int64), per_rank]))
    counts = total[: 4 * len(names)].reshape(len(names), 4)
    out = _state_metrics(names, counts)
    out["dimred/topology_update_seconds"] = float(update_seconds)
    out["dimred/topology_updates"] = float(len(history))
    if history:
        last = history[-1]
        out["dimred/last_update_step"] = float(last["step"])
        out.update({f"dimred/{k}": float(v) for k, v in last.items() if k not in ("step", "seconds")})
    if ever is not None:
        out["dimred/itop_rate"] = float(counts[:, 3].sum()) / float(counts[:, :3].sum())
    if opt is not None:
        out.update(_byte_metrics(total[4 * len(names) :].reshape(-1, 2)))
    return out


def _state_metrics(names: list[str], counts: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        train, freeze, prune = (int(x) for x in counts[i, :3])
        n = train + freeze + prune
        out[f"dimred/density/{name}"] = (train + freeze) / n
        out[f"dimred/train_fraction/{name}"] = train / n
    train, freeze, prune = (int(x) for x in counts[:, :3].sum(0))
    n = train + freeze + prune
    out["dimred/density"] = (train + freeze) / n
    out["dimred/fraction/train"] = train / n
    out["dimred/fraction/freeze"] = freeze / n
    out["dimred/fraction/prune"] = prune / n
    return out


def _byte_metrics(per_rank: torch.Tensor) -> dict[str, float]:
    """``per_rank``: (world_size, 2) of (state, dense) bytes."""
    state, dense = (int(x) for x in per_rank.sum(0))
    r = int(per_rank[:, 0].argmax())
    r_state, r_dense = (int(x) for x in per_rank[r])
    return {
        "dimred/optimizer/state_bytes": float(state),
        "dimred/optimizer/dense_bytes": float(dense),
        "dimred/optimizer/reclaimed_bytes": float(dense - state),
        "dimred/optimizer/rank_state_bytes": float(r_state),
        "dimred/optimizer/rank_dense_bytes": float(r_dense),
        "dimred/optimizer/rank_reclaimed_bytes": float(r_dense - r_state),
    }
