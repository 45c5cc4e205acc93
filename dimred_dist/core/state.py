"""Per-element TRAIN / FREEZE / PRUNE state of the managed parameters.

Every managed parameter holds two boolean tensors over the slice of its flattened index space
that this process owns (the whole tensor without sharding, a shard under ZeRO):

* ``keep``: False for PRUNE entries (value exactly 0, no gradient, no optimizer state);
* ``train``: True for TRAIN entries. ``train`` implies ``keep``; ``keep & ~train`` is FREEZE.

Masks are updated in place so that anything holding a reference (hooks, optimizers) stays valid.
Hyper-parameters never live here: this is data only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import torch


class ElementState(IntEnum):
    """The three states an element of a managed parameter can be in."""

    TRAIN = 0
    FREEZE = 1
    PRUNE = 2


@dataclass
class ParamState:
    """State of one managed parameter over the global flat range ``[start, end)`` owned locally.

    Args:
        name: Fully qualified parameter name (the key everywhere).
        shape: Global shape of the parameter.
        start: First global flat index owned by this process.
        end: One past the last global flat index owned by this process.
        keep: Local bool tensor, False where the element is pruned.
        train: Local bool tensor, True where the element is trained.
    """

    name: str
    shape: tuple[int, ...]
    start: int
    end: int
    keep: torch.Tensor = field(repr=False)
    train: torch.Tensor = field(repr=False)

    @classmethod
    def dense(cls, name: str, shape: tuple[int, ...], start: int, end: int) -> ParamState:
        """All local entries TRAIN."""
        n = end - start
        return cls(name, tuple(shape), start, end, torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool))

    def __post_init__(self) -> None:
        n = self.end - self.start
        if not 0 <= self.start <= self.end <= self.numel:
            raise ValueError(f"{self.name}: local range [{self.start}, {self.end}) outside 0..{self.numel}")
        for label, t in (("keep", self.keep), ("train", self.train)):
            if t.dtype != torch.bool or t.shape != (n,):
                raise ValueError(f"{self.name}: {label} must be a bool tensor of shape ({n},), got {t.dtype} {tuple(t.shape)}")

    @property
    def numel(self) -> int:
        """Global number of elements of the parameter."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def local_numel(self) -> int:
        return self.end - self.start

    def prune_mask(self) -> torch.Tensor:
        return ~self.keep

    def freeze_mask(self) -> torch.Tensor:
        return self.keep & ~self.train

    def set_keep(self, keep: torch.Tensor, *, train_new: bool = True) -> None:
        """Replace the keep mask in place; newly kept entries become TRAIN (or FREEZE), pruned lose TRAIN."""
        keep = keep.to(self.keep.device, torch.bool)
        grown = keep & ~self.keep
        self.keep.copy_(keep)
        self.train &= keep
        if train_new:
            self.train |= grown

    def set_train(self, train: torch.Tensor) -> None:
        """Replace the train mask in place; TRAIN requires keep, so pruned entries stay pruned."""
        self.train.copy_(train.to(self.train.device, torch.bool) & self.keep)

    def counts(self) -> dict[ElementState, int]:
        """Local counts of each state."""
        n_keep = int(self.keep.sum())
        n_train = int(self.train.sum())
        return {
            ElementState.TRAIN: n_train,
            ElementState.FREEZE: n_keep - n_train,
            ElementState.PRUNE: self.local_numel - n_keep,
        }

    def codes(self) -> torch.Tensor:
        """Local uint8 tensor of :class:`ElementState` codes."""
        out = torch.full((self.local_numel,), ElementState.PRUNE, dtype=torch.uint8)
        out[self.keep] = ElementState.FREEZE
        out[self.train] = ElementState.TRAIN
        return out


class DimRedState:
    """The state of all managed parameters, keyed by parameter name."""

    def __init__(self, params: dict[str, ParamState] | None = None) -> None:
        self.params: dict[str, ParamState] = dict(params or {})

    def __getitem__(self, name: str) -> ParamState:
        return self.params[name]

    def __contains__(self, name: str) -> bool:
        return name in self.params

    def __iter__(self):
        return iter(self.params.values())

    def __len__(self) -> int:
        return len(self.params)

    def add(self, ps: ParamState) -> None:
        if ps.name in self.params:
            raise ValueError(f"parameter {ps.name!r} is already managed")
        self.params[ps.name] = ps

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat dict of tensors (safetensors-friendly): ``<name>.keep``, ``<name>.train``, ``<name>.range``."""
        out: dict[str, torch.Tensor] = {}
        for name, ps in self.params.items():
            out[f"{name}.keep"] = ps.keep.clone()
            out[f"{name}.train"] = ps.train.clone()
            out[f"{name}.range"] = torch.tensor([ps.start, ps.end], dtype=torch.int64)
            out[f"{name}.shape"] = torch.tensor(ps.shape, dtype=torch.int64)
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load masks saved by :meth:`state_dict` in place; ranges and shapes must match."""
        expected = {f"{n}.{k}" for n in self.params for k in ("keep", "train", "range", "shape")}
        missing, unexpected = expected - set(sd), set(sd) - expected
        if missing or unexpected:
            raise KeyError(
                f"state does not match the managed parameters: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        for name, ps in self.params.items():
            shape = tuple(int(x) for x in sd[f"{name}.shape"].tolist())
            rng = tuple(int(x) for x in sd[f"{name}.range"].tolist())
            if shape != ps.shape or rng != (ps.start, ps.end):
                raise ValueError(
                    f"{name}: saved shape {shape} range {rng} != current shape {ps.shape} range {(ps.start, ps.end)}"
                )
            for key in ("keep", "train"):
                t = sd[f"{name}.{key}"]
                if t.dtype != torch.bool or t.shape != (ps.local_numel,):
                    raise ValueError(f"{name}.{key}: expected bool ({ps.local_numel},), got {t.dtype} {tuple(t.shape)}")
            ps.keep.copy_(sd[f"{name}.keep"])
            ps.train.copy_(sd[f"{name}.train"] & ps.keep)
