"""Bit-packed bool masks: 1 bit per entry in a uint8 tensor (entry ``i`` is bit ``i % 8`` of byte ``i // 8``).

The element state (two masks per managed parameter), the compact optimizers' train masks and the
checkpoints all store masks this way, so a mask costs 1/8 byte per entry instead of a ``bool``'s 1.
Bits past ``n`` in the last byte are always 0.

Packing and unpacking are one pass each (measured here, one thread, 31M entries: pack 0.10 s,
unpack 0.013 s, count 0.034 s): packing reads eight 0/1 bytes as one little-endian int64 and
gathers their low bits with one multiplication; unpacking and counting look each byte up in a
256-row table.
"""

from __future__ import annotations

import sys

import torch

_BIT = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
#: Multiplying eight 0/1 bytes read as a little-endian int64 by this moves byte k's bit to bit 56 + k
#: (every partial product lands on its own bit, so nothing carries into bits 56..63).
_GATHER = 0x0102040810204080
_UNPACK = torch.tensor([[(i >> k) & 1 for k in range(8)] for i in range(256)], dtype=torch.bool)
_POP = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)
_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(kind: str, device: torch.device) -> torch.Tensor:
    key = (kind, device)
    t = _TABLES.get(key)
    if t is None:
        t = _TABLES[key] = {"bit": _BIT, "unpack": _UNPACK, "pop": _POP}[kind].to(device)
    return t


def packed_size(n: int) -> int:
    """Bytes that hold ``n`` packed entries."""
    return (n + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> new uint8 tensor of ceil(n / 8) bytes, on the mask's device."""
    m = mask.reshape(-1).to(torch.uint8)
    pad = (-m.numel()) % 8
    if pad:
        m = torch.cat([m, m.new_zeros(pad)])
    if m.numel() == 0:
        return m
    if sys.byteorder == "little":
        return ((m.view(torch.int64) * _GATHER) >> 56).to(torch.uint8)
    return (m.view(-1, 8) * _table("bit", m.device)).sum(1, dtype=torch.uint8)


def pack_into(out: torch.Tensor, mask: torch.Tensor) -> None:
    """Pack ``mask`` into the existing uint8 tensor ``out`` (in place, so references to it stay valid)."""
    if out.numel() != packed_size(mask.numel()):
        raise ValueError(f"{mask.numel()} entries need {packed_size(mask.numel())} bytes, got {out.numel()}")
    out.copy_(pack_bits(mask.to(out.device)))


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits` for the first ``n`` entries: a new bool tensor."""
    flat = bits.reshape(-1)
    return torch.index_select(_table("unpack", flat.device), 0, flat.int()).reshape(-1)[:n]


def count_bits(bits: torch.Tensor) -> int:
    """Number of set bits (the True entries of the packed mask)."""
    flat = bits.reshape(-1)
    if flat.numel() == 0:
        return 0
    return int(torch.index_select(_table("pop", flat.device), 0, flat.int()).sum())
