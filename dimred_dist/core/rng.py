"""Counter-based random numbers keyed by (seed, step, parameter name, global element index).

Every rank computes the random number of a global element from its coordinates alone, so the
ranks draw the same numbers for the same entries without talking and whichever rank owns an
element. The hash is murmur3's 32-bit finaliser chained over the key words, evaluated in int64
arithmetic that never overflows (the multiplications are split into 16-bit halves), so the result
is the same on every device and build.
"""

from __future__ import annotations

import zlib

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor | int, c: int) -> torch.Tensor | int:
    """(x * c) mod 2**32 for 0 <= x < 2**32 without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return ((x * lo) + (((x * hi) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor | int) -> torch.Tensor | int:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _combine(h: torch.Tensor | int, word: torch.Tensor | int) -> torch.Tensor | int:
    return _fmix32((_mul32(h, 0x9E3779B1) ^ (word & _M32)) & _M32)


def name_key(name: str) -> int:
    """Stable 32-bit key of a parameter name (independent of Python's hash seed)."""
    return zlib.crc32(name.encode("utf-8")) & _M32


#: Entries hashed at a time by :func:`random_uint32`.
_BLOCK = 1 << 20


def random_uint32(seed: int, step: int, name: str, start: int, end: int, *, salt: int = 0) -> torch.Tensor:
    """32-bit random integers (as int64) for global flat indices ``start .. end-1`` of parameter ``name``."""
    h = 0x6A09E667
    for word in (seed & _M32, (seed >> 32) & _M32, step & _M32, (step >> 32) & _M32, name_key(name), salt & _M32):
        h = _combine(h, word)
    out = torch.empty(max(end - start, 0), dtype=torch.int64)
    for lo in range(start, end, _BLOCK):  # in blocks: the hash's int64 temporaries stay small
        idx = torch.arange(lo, min(lo + _BLOCK, end), dtype=torch.int64)
        out[lo - start : lo - start + idx.numel()] = _combine(_combine(torch.full_like(idx, h), idx & _M32), idx >> 32)
    return out


def random_uniform(seed: int, step: int, name: str, start: int, end: int, *, salt: int = 0) -> torch.Tensor:
    """Uniform floats in [0, 1) (float64, 32 random bits) for the given global flat indices."""
    return random_uint32(seed, step, name, start, end, salt=salt).to(torch.float64) / 2.0**32
