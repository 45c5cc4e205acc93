"""The method registry: names in recipes map to method classes, with an error that helps."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T", bound=type)

_METHODS: dict[str, type] = {}


def register_method(name: str):
    """Class decorator registering a method under ``name`` (lower case, unique).

    Example::

        @register_method("my_method")
        class MyMethod(DynamicSparseMethod):
            config_cls = MyMethodConfig
    """

    def deco(cls: T) -> T:
        key = name.lower()
        if key in _METHODS and _METHODS[key] is not cls:
            raise ValueError(f"method {key!r} is already registered by {_METHODS[key].__qualname__}")
        _METHODS[key] = cls
        cls.method_name = key
        return cls

    return deco


def get_method(name: str) -> type:
    """The method class registered under ``name``.

    Raises:
        ValueError: Listing the registered methods and how to add one.
    """
    key = str(name).lower()
    if key not in _METHODS:
        raise ValueError(
            f"unknown method {name!r}; registered methods: {', '.join(sorted(_METHODS))}. "
            "To add one, subclass dimred_dist.methods.base.Method and decorate it with "
            "@dimred_dist.core.registry.register_method('<name>')."
        )
    return _METHODS[key]


def registered_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_METHODS)
