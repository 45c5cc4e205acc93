"""Strict types for recipe and job values: every field holds what its annotation declares.

YAML and hand-written mappings make some mistakes silent: a string where a list is expected
(``include: attn`` is iterated character by character), ``biases: maybe`` (truthy), ``1.5`` where
an integer is meant. :func:`check_fields` checks a built dataclass's fields against their
annotations (``bool``, ``int``, ``float``, ``str``, ``list[...]``, ``dict[..., ...]``, unions,
``Literal``, nested dataclasses) and raises ``TypeError`` naming the key and the value.

Error messages show values through :func:`brief`, which never formats more than a few dozen
characters of a user value (a YAML alias bomb expands to a structure whose full ``repr`` would
take minutes and all memory).
"""

from __future__ import annotations

import dataclasses
import reprlib
import types
import typing
from typing import Any

__all__ = ["brief", "check_fields", "describe", "matches"]

_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def brief(value: Any) -> str:
    """A bounded ``repr`` of a user value (at most ~100 characters, whatever its size or depth)."""
    text = _REPR.repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def describe(hint: Any) -> str:
    """A type annotation in words, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (list, tuple):
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
        return f"a list of {plural.get(args[0], describe(args[0]))}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type ``hint`` (an int is a float; a bool is no int)."""
    if hint is Any or hint is object:
        return True
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and (not args or all(matches(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict) and (len(args) < 2 or all(matches(v, args[1]) for v in value.values()))
    if origin is typing.ClassVar:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (hint, dict))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this checker does not know: the dataclass's own checks apply


def _suggestion(value: Any, hint: Any) -> str:
    """A suggestion for the commonest YAML slips: a scalar where a list is expected, a word for a bool."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return next((s for s in (_suggestion(value, a) for a in typing.get_args(hint)) if s), "")
    if origin in (list, tuple) and isinstance(value, (str, int, float)):
        return f" (a YAML list: [{value}])"
    if hint is bool and isinstance(value, str):
        return " (write true or false)"
    return ""


def check_fields(obj: Any, where: str) -> None:
    """Raise ``TypeError`` naming ``<where>.<field>`` for the first field of dataclass ``obj`` whose value
    does not match its annotation."""
    try:
        hints = typing.get_type_hints(type(obj))
    except (NameError, TypeError):  # an annotation that cannot be resolved here: nothing to check against
        return
    for f in dataclasses.fields(obj):
        if not f.init or f.name not in hints:
            continue
        value, hint = getattr(obj, f.name), hints[f.name]
        if not matches(value, hint):
            raise TypeError(f"{where}.{f.name} must be {describe(hint)}, got {brief(value)}{_suggestion(value, hint)}")
