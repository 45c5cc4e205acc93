"""Bytes held by tensors reachable from Python objects, each storage counted once.

A walk over attributes, lists, tuples and dicts down to a fixed depth; a storage seen before (a
view of a flat buffer, a tensor reached twice) is not counted again, so categories counted one
after another with the same ``seen`` set never share a byte. No framework knowledge lives here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr() if s.nbytes() else id(s))


def tensors_in(obj: Any, depth: int = 3, *, skip: Iterable[Any] = ()) -> list[torch.Tensor]:
    """Tensors in ``obj`` (a tensor, a list / tuple / set / dict of them, nested to ``depth``); a
    tensor's ``.grad`` is not included (count gradients separately)."""
    out: list[torch.Tensor] = []
    skip_ids = {id(x) for x in skip}

    def walk(x: Any, d: int) -> None:
        if id(x) in skip_ids:
            return
        if torch.is_tensor(x):
            out.append(x)
        elif d > 0 and isinstance(x, dict):
            for v in x.values():
                walk(v, d - 1)
        elif d > 0 and isinstance(x, (list, tuple, set)):
            for v in x:
                walk(v, d - 1)

    walk(obj, depth)
    return out


def count_bytes(tensors: Iterable[torch.Tensor], seen: set[tuple[str, int]]) -> int:
    """Bytes of the storages behind ``tensors`` not in ``seen`` (added to it)."""
    total = 0
    for t in tensors:
        if t.is_meta or t.untyped_storage().nbytes() == 0:  # meta tensors describe shapes, hold nothing
            continue
        key = storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def attribute_tensors(obj: Any, depth: int = 3, *, skip: Iterable[Any] = ()) -> dict[str, list[torch.Tensor]]:
    """Per attribute name of ``obj`` (``vars``, name-mangled names included), the tensors under it."""
    out: dict[str, list[torch.Tensor]] = {}
    for name, value in vars(obj).items():
        found = tensors_in(value, depth, skip=skip)
        if found:
            out[name] = found
    return out
