"""Per-element TRAIN / FREEZE / PRUNE state of the managed parameters.

Every managed parameter holds two bit-packed masks (2 bits per entry in all, see
:mod:`dimred_dist.core.bits`) over the slice of its flattened index space that this process owns
(the whole tensor without sharding, a shard under ZeRO):

* ``keep``: False for PRUNE entries (value exactly 0, no gradient, no optimizer state);
* ``train``: True for TRAIN entries. ``train`` implies ``keep``; ``keep & ~train`` is FREEZE.

:attr:`ParamState.keep` and :attr:`ParamState.train` unpack a mask into a new ``bool`` tensor: a
read, never a handle to write through (writing into it changes nothing). Masks change through
:meth:`ParamState.set_keep`, :meth:`ParamState.set_train` and :meth:`ParamState.set_masks`, which
repack in place, so the packed tensors (:attr:`ParamState.keep_bits`, :attr:`ParamState.train_bits`)
keep their identity. Hyper-parameters never live here: this is data only.
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch

from dimred_dist.core.bits import count_bits, pack_bits, pack_into, packed_size, unpack_bits


class ElementState(IntEnum):
    """The three states an element of a managed parameter can be in."""

    TRAIN = 0
    FREEZE = 1
    PRUNE = 2


class ParamState:
    """State of one managed parameter over the global flat range ``[start, end)`` owned locally.

    Args:
        name: Fully qualified parameter name (the key everywhere).
        shape: Global shape of the parameter.
        start: First global flat index owned by this process.
        end: One past the last global flat index owned by this process.
        keep: Local bool tensor, False where the element is pruned.
        train: Local bool tensor, True where the element is trained (taken ``& keep``).
        device: Where the packed masks live (default: ``keep``'s device).
    """

    __slots__ = ("name", "shape", "start", "end", "keep_bits", "train_bits")

    def __init__(self, name: str, shape: tuple[int, ...], start: int, end: int, keep: torch.Tensor,
                 train: torch.Tensor, *, device: torch.device | str | None = None) -> None:
        self.name, self.shape, self.start, self.end = name, tuple(int(d) for d in shape), int(start), int(end)
        n = self.end - self.start
        if not 0 <= self.start <= self.end <= self.numel:
            raise ValueError(f"{self.name}: local range [{self.start}, {self.end}) outside 0..{self.numel}")
        for label, t in (("keep", keep), ("train", train)):
            if t.dtype != torch.bool or t.shape != (n,):
                raise ValueError(f"{self.name}: {label} must be a bool tensor of shape ({n},), "
                                 f"got {t.dtype} {tuple(t.shape)}")
        device = keep.device if device is None else torch.device(device)
        keep = keep.to(device)
        self.keep_bits = pack_bits(keep)
        self.train_bits = pack_bits(train.to(device) & keep)

    @classmethod
    def dense(cls, name: str, shape: tuple[int, ...], start: int, end: int, *,
              device: torch.device | str | None = None) -> ParamState:
        """All local entries TRAIN."""
        ones = torch.ones(end - start, dtype=torch.bool, device=device)
        return cls(name, tuple(shape), start, end, ones, ones)

    def __repr__(self) -> str:
        return f"ParamState(name={self.name!r}, shape={self.shape}, start={self.start}, end={self.end})"

    @property
    def numel(self) -> int:
        """Global number of elements of the parameter."""
        return math.prod(self.shape)

    @property
    def local_numel(self) -> int:
        return self.end - self.start

    @property
    def device(self) -> torch.device:
        return self.keep_bits.device

    @property
    def keep(self) -> torch.Tensor:
        """A new bool tensor: False where PRUNE."""
        return unpack_bits(self.keep_bits, self.local_numel)

    @property
    def train(self) -> torch.Tensor:
        """A new bool tensor: True where TRAIN."""
        return unpack_bits(self.train_bits, self.local_numel)

    def prune_mask(self) -> torch.Tensor:
        return unpack_bits(~self.keep_bits, self.local_numel)

    def freeze_mask(self) -> torch.Tensor:
        return unpack_bits(self.keep_bits & ~self.train_bits, self.local_numel)

    def nbytes(self) -> int:
        """Bytes of the packed masks."""
        return 2 * packed_size(self.local_numel)

    def set_masks(self, keep: torch.Tensor, train: torch.Tensor) -> None:
        """Replace both masks in place (``train`` is taken ``& keep``)."""
        self._check(keep, "keep")
        self._check(train, "train")
        keep = keep.to(self.device, torch.bool)
        pack_into(self.keep_bits, keep)
        pack_into(self.train_bits, train.to(self.device, torch.bool) & keep)

    def set_keep(self, keep: torch.Tensor, *, train_new: bool = True) -> None:
        """Replace the keep mask in place; newly kept entries become TRAIN (or FREEZE), pruned lose TRAIN."""
        self._check(keep, "keep")
        new_bits = pack_bits(keep.to(self.device, torch.bool))
        grown = new_bits & ~self.keep_bits
        self.train_bits &= new_bits
        if train_new:
            self.train_bits |= grown
        self.keep_bits.copy_(new_bits)

    def set_train(self, train: torch.Tensor) -> None:
        """Replace the train mask in place; TRAIN requires keep, so pruned entries stay pruned."""
        self._check(train, "train")
        self.train_bits.copy_(pack_bits(train.to(self.device, torch.bool)) & self.keep_bits)

    def _check(self, mask: torch.Tensor, label: str) -> None:
        if mask.shape != (self.local_numel,):
            raise ValueError(f"{self.name}: {label} must have shape ({self.local_numel},), got {tuple(mask.shape)}")

    def counts(self) -> dict[ElementState, int]:
        """Local counts of each state."""
        n_keep = count_bits(self.keep_bits)
        n_train = count_bits(self.train_bits)
        return {
            ElementState.TRAIN: n_train,
            ElementState.FREEZE: n_keep - n_train,
            ElementState.PRUNE: self.local_numel - n_keep,
        }

    def codes(self) -> torch.Tensor:
        """Local uint8 tensor of :class:`ElementState` codes."""
        out = torch.full((self.local_numel,), ElementState.PRUNE, dtype=torch.uint8, device=self.device)
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
            out[f"{name}.keep"] = ps.keep
            out[f"{name}.train"] = ps.train
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
            ps.set_masks(sd[f"{name}.keep"], sd[f"{name}.train"])
