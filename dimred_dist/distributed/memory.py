"""A rank's training memory by category, counted from the tensors a DeepSpeed engine holds.

:func:`rank_memory` returns bytes per category, each storage counted once, in this order (a storage
goes to the first category that reaches it):

* ``weights``: the module's parameters as this rank holds them (the whole tensor under ZeRO-1/2,
  the ``ds_tensor`` partition under ZeRO-3, plus any gathered copy at the time of counting) and
  the ZeRO optimizer's flat low-precision buffers behind them;
* ``masters``: the ZeRO optimizer's fp32 partitions (its attributes named ``*fp32*``);
* ``optimizer``: the tensors in the inner optimizer's ``state`` (moments; a compact optimizer's
  bit-packed train masks);
* ``gradients``: the parameters' and masters' ``.grad`` and the ZeRO optimizer's gradient
  buffers (attributes named ``*grad*`` or ``*ipg*``: reduce buckets, partition buffers);
* ``dimred``: the manager's own tensors (packed masks, method state), if a manager is given;
* ``zero_other``: every other tensor under the ZeRO optimizer's attributes.

Gradient buffers exist during a step only in part: count after ``engine.backward`` and again after
``engine.step`` and take the larger per category. Tensors held by DeepSpeed objects other than the
ZeRO optimizer (the ZeRO-3 parameter coordinator's prefetch buffers, communication buffers) and
activations are not counted; peak RSS covers them.
"""

from __future__ import annotations

from typing import Any

from dimred_dist.core.tensors import attribute_tensors, count_bytes, tensors_in

CATEGORIES = ("weights", "masters", "optimizer", "gradients", "dimred", "zero_other")


def rank_memory(engine: Any, manager: Any = None) -> dict[str, int]:
    """Bytes per category (see the module docstring) on this rank, and ``total``."""
    module = engine.module
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", None)
    params = list(module.parameters())
    by_attr = attribute_tensors(zero, skip=[inner, module]) if zero is not None and zero is not inner else {}
    seen: set = set()
    out: dict[str, int] = {}

    weights = [getattr(p, "ds_tensor", None) for p in params] + [p.data for p in params]
    weights += [t for name, ts in by_attr.items() if "bit16" in name or "fp16" in name for t in ts]
    out["weights"] = count_bytes([t for t in weights if t is not None], seen)

    masters = [t for name, ts in by_attr.items() if "fp32" in name and "grad" not in name for t in ts]
    out["masters"] = count_bytes(masters, seen)

    out["optimizer"] = count_bytes(tensors_in(getattr(inner, "state", {}), 3), seen) if inner is not None else 0

    grads = [p.grad for p in params if p.grad is not None] + [t.grad for t in masters if t.grad is not None]
    grads += [t for name, ts in by_attr.items() if "grad" in name or "ipg" in name for t in ts]
    out["gradients"] = count_bytes(grads, seen)

    out["dimred"] = count_bytes(manager.own_tensors(), seen) if manager is not None else 0
    out["zero_other"] = count_bytes([t for ts in by_attr.values() for t in ts], seen)
    out["total"] = sum(out[k] for k in CATEGORIES)
    return out


def merge_max(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Per category the larger of two counts (``total`` recomputed)."""
    out = {k: max(a.get(k, 0), b.get(k, 0)) for k in CATEGORIES}
    out["total"] = sum(out.values())
    return out
