"""Recipe configuration: validated dataclasses loaded from YAML.

A recipe is serializable values only (no model, optimizer or process group). Unknown keys,
impossible values and unknown names raise before anything is built, naming the offending value.

Example YAML::

    method: rigl
    sparsity: 0.9
    distribution: erk
    seed: 0
    targets:
      exclude: ["lm_head"]
    schedule:                 # optional: the method's default schedule otherwise
      kind: periodic
      interval: 100
      drop_fraction: 0.3
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from dimred_dist.core.distributions import DISTRIBUTIONS
from dimred_dist.core.registry import get_method
from dimred_dist.core.schedules import Schedule, schedule_from_dict
from dimred_dist.core.targets import TargetConfig
from dimred_dist.core.typecheck import brief, check_fields

#: Schedule values that recipes written for SET / RigL before schedules were a recipe section give
#: in ``args``, with their name in a ``periodic`` schedule.
LEGACY_SCHEDULE_ARGS = {
    "update_interval": "interval", "drop_fraction": "drop_fraction", "end_fraction": "end_fraction", "decay": "decay",
}


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting keys it does not define."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a mapping, got {type(data).__name__}: {brief(data)}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {brief(unknown)}; valid keys: {sorted(names)}")
    try:
        obj = cls(**data)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None
    check_fields(obj, where)  # after the class's own checks, which name ranges too
    return obj


@dataclass(kw_only=True)
class MethodConfig:
    """Base of the per-method hyper-parameter dataclasses (the ``args`` section of a recipe)."""


@dataclass(kw_only=True)
class Recipe:
    """What to prune or freeze, how much, and with which method.

    Attributes:
        method: Registered method name (see :func:`dimred_dist.core.registry.registered_methods`).
        sparsity: Fraction of managed entries that are not trained, in [0, 1): pruned for pruning
            methods, frozen for freezing methods.
        distribution: How the budget is split across layers: ``uniform``, ``erk`` or ``global``.
        seed: Seed of every random choice (masks are reproducible across world sizes).
        targets: Which parameters are managed.
        freeze: Regular expressions of parameter names frozen as whole tensors (``requires_grad=False``
            before the optimizer / engine is built, so nothing is allocated for them).
        schedule: When the topology changes and to which density (:mod:`dimred_dist.core.schedules`):
            a mapping with a ``kind`` (``one_shot``, ``periodic``, ``cubic``, ``imp``) and its values;
            default: the method's own default schedule. Any method's scores work with any kind.
        allow_empty_layers: Accept a per-layer budget that rounds to zero kept entries in some layer
            (the whole layer pruned or frozen); refused by default, naming the layers.
        args: Method hyper-parameters; validated into the method's config dataclass. For backward
            compatibility ``update_interval``, ``drop_fraction``, ``end_fraction`` and ``decay`` given
            here move into a ``periodic`` schedule.
    """

    method: str
    sparsity: float
    distribution: str = "erk"
    seed: int = 0
    targets: TargetConfig = field(default_factory=TargetConfig)
    freeze: list[str] = field(default_factory=list)
    schedule: Any = None
    allow_empty_layers: bool = False
    args: Any = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise TypeError(f"sparsity must be a number, got {brief(self.sparsity)}")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        self.sparsity = float(self.sparsity)
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"unknown sparsity distribution {brief(self.distribution)}; known: {', '.join(DISTRIBUTIONS)}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {brief(self.seed)}")
        self.targets = build_dataclass(TargetConfig, self.targets, "targets")
        if not isinstance(self.freeze, list) or not all(isinstance(p, str) for p in self.freeze):
            raise TypeError(f"freeze must be a list of regular expressions, got {brief(self.freeze)}")
        method_cls = get_method(self.method)
        self.method = method_cls.method_name
        self.schedule, self.args = _split_legacy_schedule(self.schedule, self.args, method_cls)
        self.schedule = schedule_from_dict(self.schedule, f"schedule of method {self.method!r}")
        self.schedule.check_density(self.density)
        if isinstance(self.args, dict):
            misplaced = sorted(set(self.args) & {f.name for f in dataclasses.fields(self.schedule)})
            if misplaced:
                raise ValueError(
                    f"args of method {self.method!r}: {misplaced} are values of the {self.schedule.kind!r} schedule; "
                    f"give them in the recipe's `schedule:` section"
                )
        self.args = build_dataclass(method_cls.config_cls, self.args, f"args of method {self.method!r}")
        method_cls.check_recipe(self)

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML/JSON serializable)."""
        out = dataclasses.asdict(self)
        out["schedule"] = self.schedule.to_dict()
        return out


def _split_legacy_schedule(schedule: Any, args: Any, method_cls: type) -> tuple[Any, Any]:
    """The schedule mapping (the method's default if none is given) and the args without schedule values.

    Raises:
        ValueError: If ``args`` holds schedule values and the recipe has a ``schedule`` section too.
    """
    if isinstance(schedule, Schedule):
        return schedule, args
    legacy = {}
    if isinstance(args, dict):
        legacy = {k: args[k] for k in LEGACY_SCHEDULE_ARGS if k in args}
        args = {k: v for k, v in args.items() if k not in legacy}
    if schedule is None:
        schedule = dict(method_cls.default_schedule)
        if legacy:
            if schedule.get("kind") != "periodic":
                raise ValueError(
                    f"args {sorted(legacy)} of method {method_cls.method_name!r} belong to a periodic schedule; give "
                    "them in a `schedule:` section with `kind: periodic`"
                )
            schedule.update({LEGACY_SCHEDULE_ARGS[k]: v for k, v in legacy.items()})
    elif legacy:
        raise ValueError(
            f"args {sorted(legacy)} are schedule values and the recipe has a `schedule:` section; give them there "
            f"(as {', '.join(LEGACY_SCHEDULE_ARGS[k] for k in sorted(legacy))})"
        )
    return schedule, args


def recipe_from_dict(data: Any, where: str = "recipe") -> Recipe:
    """A :class:`Recipe` from a mapping, with errors that name the offending key or value."""
    return build_dataclass(Recipe, data, where)


def load_recipe(source: str | os.PathLike | dict) -> Recipe:
    """Load and validate a recipe from a YAML file path or a mapping.

    Raises:
        FileNotFoundError: If the file does not exist.
        TypeError: If the YAML document is not a mapping.
        ValueError: For unknown keys, names or impossible values.
    """
    if isinstance(source, dict):
        return recipe_from_dict(source)
    path = os.fspath(source)
    return recipe_from_dict(read_yaml_mapping(path, "recipe"), where=path)


#: Nodes a YAML document may hold once its aliases (``*name``) are expanded: recipes and jobs hold a
#: few hundred, and nested aliases expand exponentially ("billion laughs"), which anything that walks
#: or copies the data (an error message, ``dataclasses.asdict``) would then pay for.
MAX_YAML_NODES = 100_000


class YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` as a number, as YAML 1.2 and Python do (YAML 1.1,
    PyYAML's default, wants ``1.0e-4`` and reads ``1e-4`` as a string)."""


def _expanded_nodes(obj: Any, memo: dict[int, int]) -> int:
    """Nodes of ``obj`` with every shared reference counted each time (linear in the distinct nodes)."""
    if not isinstance(obj, (list, dict)):
        return 1
    if id(obj) in memo:
        return memo[id(obj)]
    memo[id(obj)] = MAX_YAML_NODES + 1  # a cycle (a recursive alias) counts as too large
    items = obj.values() if isinstance(obj, dict) else obj
    n = 1 + sum(_expanded_nodes(v, memo) for v in items)
    memo[id(obj)] = n
    return n


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: Any) -> Any:
    """Parse YAML text or a stream with :class:`YamlLoader`.

    Raises:
        ValueError: If the document expands to more than :data:`MAX_YAML_NODES` nodes.
    """
    data = yaml.load(text, Loader=YamlLoader)  # noqa: S506 (a SafeLoader subclass)
    n = _expanded_nodes(data, {})
    if n > MAX_YAML_NODES:
        raise ValueError(f"YAML: the document expands to more than {MAX_YAML_NODES} values through its aliases "
                         "(*name); refusing it")
    return data


def read_yaml_mapping(path: str, what: str) -> dict[str, Any]:
    """The YAML mapping in ``path`` (:func:`load_yaml`); ``what`` names the file in errors.

    Raises:
        FileNotFoundError: If there is no such file.
        TypeError: If the document is not a mapping.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = load_yaml(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {brief(str(e))}") from None
    if not isinstance(data, dict):
        raise TypeError(f"{path}: a {what} must be a YAML mapping, got {type(data).__name__}")
    return data
