"""Mask-aware optimizers with compact state."""

from dimred_dist.optim.compact import CompactAdamW, CompactOptimizer, CompactSGD, pack_bits, unpack_bits

__all__ = ["CompactAdamW", "CompactOptimizer", "CompactSGD", "pack_bits", "unpack_bits"]
