"""Which parameters of a model are managed: selection by module type and name pattern."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.nn as nn

#: Module class names whose ``weight`` is managed by default. ``Conv1D`` is Hugging Face's
#: transposed linear layer (GPT-2); classes are matched by name along the MRO so that core never
#: imports transformers and subclasses (e.g. ``NonDynamicallyQuantizableLinear``) match.
DEFAULT_MODULE_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "Embedding")

_NORM_TYPES = ("LayerNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "RMSNorm")


@dataclass(kw_only=True)
class TargetConfig:
    """Selects the managed parameters.

    Attributes:
        module_types: Module class names whose weights are managed.
        include: Regular expressions; a parameter is managed only if its name matches one (search).
        exclude: Regular expressions; a parameter whose name matches one is never managed.
        biases: Also manage the ``bias`` of the selected modules.
        norms: Also manage weights and biases of normalization layers.
    """

    module_types: list[str] = field(default_factory=lambda: list(DEFAULT_MODULE_TYPES))
    include: list[str] = field(default_factory=lambda: [".*"])
    exclude: list[str] = field(default_factory=list)
    biases: bool = False
    norms: bool = False

    def __post_init__(self) -> None:
        if not self.module_types:
            raise ValueError("targets.module_types is empty: nothing could be managed")
        for label, patterns in (("include", self.include), ("exclude", self.exclude)):
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as e:
                    raise ValueError(f"targets.{label}: invalid regular expression {p!r}: {e}") from None


def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def select_parameters(model: nn.Module, targets: TargetConfig) -> dict[str, nn.Parameter]:
    """Managed parameters in model order, keyed by their canonical name (tied weights appear once).

    Raises:
        ValueError: If no parameter matches, naming the patterns and what the model has.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    wanted_types = set(targets.module_types)
    include = [re.compile(p) for p in targets.include]
    exclude = [re.compile(p) for p in targets.exclude]
    selected: dict[str, nn.Parameter] = {}
    for _, module in model.named_modules():
        names = _class_names(module)
        is_norm = bool(names & set(_NORM_TYPES))
        attrs: list[str] = []
        if names & wanted_types:
            attrs = ["weight", "bias"] if targets.biases else ["weight"]
        if is_norm and targets.norms:
            attrs = ["weight", "bias"]
        for attr in attrs:
            p = getattr(module, attr, None)
            if not isinstance(p, nn.Parameter) or id(p) not in canonical:
                continue
            name = canonical[id(p)]
            if not any(r.search(name) for r in include) or any(r.search(name) for r in exclude):
                continue
            selected.setdefault(name, p)
    if not selected:
        types = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(
            f"no parameter matches the targets (module_types={targets.module_types}, include={targets.include}, "
            f"exclude={targets.exclude}); the model has module types {types[:20]}"
        )
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    return dict(sorted(selected.items(), key=lambda kv: order[kv[0]]))


def freeze_whole_tensors(model: nn.Module, patterns: list[str]) -> list[str]:
    """Set ``requires_grad=False`` on every parameter whose name matches one of ``patterns``.

    Call it before the optimizer or the DeepSpeed engine is built: then no gradient, fp32 master or
    optimizer state is ever allocated for these tensors. Returns the frozen names.

    Raises:
        ValueError: If a pattern is invalid or matches no parameter.
    """
    names = [n for n, _ in model.named_parameters()]
    frozen: list[str] = []
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"freeze: invalid regular expression {pattern!r}: {e}") from None
        hits = [n for n in names if rx.search(n)]
        if not hits:
            raise ValueError(f"freeze: pattern {pattern!r} matches no parameter; parameters look like {names[:5]}")
        frozen.extend(h for h in hits if h not in frozen)
    params = dict(model.named_parameters())
    for n in frozen:
        params[n].requires_grad_(False)
    return frozen
