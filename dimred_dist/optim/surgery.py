"""Optimizer-state surgery, in one place: restart the moments of chosen entries, or the whole optimizer.

A topology update that regrows entries (SET, RigL) restarts their moments at zero; a method that
restarts training (IMP rounds) restarts the optimizer. Both must act on the optimizer that really
steps, never silently: the state of an optimizer this module does not understand raises.

* :class:`~dimred_dist.optim.compact.CompactOptimizer`: moments follow the train mask; regrown
  entries are passed to ``set_train_mask(..., reset=...)`` by the adapter, a restart drops the moments
  and step count of every tensor (the train masks stay).
* ``torch.optim.SGD`` (``momentum_buffer``), ``Adam`` / ``AdamW`` (``exp_avg``, ``exp_avg_sq`` and, with
  amsgrad, ``max_exp_avg_sq``): the entries' values are set to 0 in place; the per-tensor ``step``
  stays, so a regrown entry's bias correction uses the tensor's step, exactly as in the compact
  optimizer. A restart clears the tensor's whole state (torch re-creates it at the next step).
"""

from __future__ import annotations

from typing import Any

import torch

from dimred_dist.optim.compact import CompactOptimizer

__all__ = ["check_supported", "reset_entries", "restart"]

#: Per-entry state tensors of the torch optimizers whose state is understood.
_ENTRY_STATE = {
    torch.optim.SGD: ("momentum_buffer",),
    torch.optim.Adam: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.AdamW: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
}
#: Per-tensor scalars that may sit beside them.
_SCALARS = ("step",)


def _entry_keys(optimizer: Any) -> tuple[str, ...]:
    for cls, keys in _ENTRY_STATE.items():
        if type(optimizer) is cls:
            return keys
    known = ", ".join(c.__name__ for c in _ENTRY_STATE)
    raise TypeError(
        f"dimred_dist cannot restart the state of a {type(optimizer).__name__} (it knows CompactAdamW, CompactSGD, "
        f"{known}); topology updates need the moments of regrown entries reset. Use dimred_dist.optim.CompactAdamW "
        "or one of those optimizers."
    )


def check_supported(optimizer: Any) -> None:
    """Raise ``TypeError`` now, before training, if the moments of ``optimizer`` cannot be reset."""
    if not isinstance(optimizer, CompactOptimizer):
        _entry_keys(optimizer)


@torch.no_grad()
def reset_entries(optimizer: Any, resets: dict[torch.Tensor, torch.Tensor]) -> int:
    """Zero the per-entry state of the masked entries of each parameter (``{param: flat bool mask}``).

    Parameters without state yet are skipped. Returns the number of entries reset.

    Raises:
        TypeError: For an optimizer whose state this module does not understand (only if it holds
            state for one of the parameters), and for a compact optimizer (its resets go through
            ``set_train_mask``).
    """
    if isinstance(optimizer, CompactOptimizer):
        raise TypeError("a compact optimizer's moments are reset through set_train_mask(reset=...)")
    todo = {p: m for p, m in resets.items() if optimizer.state.get(p) and bool(m.any())}
    if not todo:
        return 0
    keys = _entry_keys(optimizer)
    n = 0
    for p, mask in todo.items():
        st = optimizer.state[p]
        unknown = sorted(k for k in st if k not in keys and k not in _SCALARS)
        if unknown:
            raise TypeError(f"{type(optimizer).__name__} state holds {unknown}, not known to dimred_dist")
        for k in keys:
            t = st.get(k)
            if t is not None:
                t.view(-1).masked_fill_(mask.reshape(-1).to(t.device), 0)
        n += int(mask.sum())
    return n


@torch.no_grad()
def restart(optimizer: Any) -> None:
    """Restart the optimizer: no moments and a step count of 0 for every parameter (the hyper-parameters,
    the learning rates included, stay)."""
    if isinstance(optimizer, CompactOptimizer):
        optimizer.restart()
        return
    if any(optimizer.state.values()):
        _entry_keys(optimizer)
    optimizer.state.clear()
