"""Score tensors for the top-k sweeps and random ways to cut them into pieces."""

from __future__ import annotations

import torch

from dimred_dist.distributed.collectives import Collectives
from dimred_dist.distributed.topk import Segment


def cases() -> list[tuple[str, torch.Tensor, int, torch.Tensor | None]]:
    """(id, scores, k, eligible) covering ties, signed zeros, integer keys and extreme k."""
    g = torch.Generator().manual_seed(1234)
    rand = torch.randn(1000, generator=g)
    zeros = torch.zeros(500)
    zeros[torch.randperm(500, generator=g)[:250]] = -0.0
    zeros[torch.randperm(500, generator=g)[:20]] = torch.randn(20, generator=g)
    few_values = torch.randint(0, 4, (777,), generator=g).float() - 1.5
    ints = torch.randint(0, 3, (600,), generator=g)
    big_ints = torch.randint(0, 2**32, (300,), generator=g, dtype=torch.int64)
    elig = torch.rand(1000, generator=g) < 0.3
    out = [
        ("random", rand, 137, None),
        ("random_k0", rand, 0, None),
        ("random_kn", rand, 1000, None),
        ("random_k1", rand, 1, None),
        ("all_equal", torch.full((513,), 0.25), 200, None),
        ("all_equal_negative", torch.full((300,), -3.0), 299, None),
        ("many_zeros_signed", zeros, 30, None),
        ("only_signed_zeros", torch.tensor([0.0, -0.0] * 64), 63, None),
        ("few_values", few_values, 400, None),
        ("infinities", torch.tensor([float("inf"), 1.0, -float("inf"), 1.0, float("inf"), -1e-45, 1e-45]), 3, None),
        ("abs_weights", rand.abs().reshape(25, 40), 500, None),
        ("int_ties", ints, 250, None),
        ("int_full_range", big_ints, 100, None),
        ("eligible", rand, 100, elig),
        ("eligible_all_of_them", rand, int(elig.sum()), elig),
        ("eligible_ties", torch.ones(1000), 50, elig),
        ("eligible_none", rand, 0, torch.zeros(1000, dtype=torch.bool)),
        ("size_1", torch.tensor([2.0]), 1, None),
        ("size_257", torch.randn(257, generator=g).round(), 128, None),  # 2 index bytes
        ("size_70000", torch.randint(0, 5, (70_000,), generator=g).float(), 30_001, None),  # 3 index bytes
    ]
    return out


def random_pieces(n: int, n_pieces: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """``n_pieces`` contiguous ranges covering ``0..n`` (some possibly empty)."""
    cuts = sorted(torch.randint(0, n + 1, (n_pieces - 1,), generator=gen).tolist())
    bounds = [0, *cuts, n]
    return list(zip(bounds, bounds[1:]))


def segments_for(group: int, scores: torch.Tensor, eligible, pieces) -> list[Segment]:
    flat = scores.reshape(-1)
    elig = None if eligible is None else eligible.reshape(-1)
    return [
        Segment(group, a, flat[a:b], None if elig is None else elig[a:b]) for a, b in pieces
    ]


def assemble(n: int, pieces_and_masks) -> torch.Tensor:
    """Union of local masks over the full index space; every index must be covered exactly once."""
    out = torch.zeros(n, dtype=torch.bool)
    cover = torch.zeros(n, dtype=torch.int64)
    for (a, b), m in pieces_and_masks:
        assert m.dtype == torch.bool and m.numel() == b - a
        out[a:b] = m
        cover[a:b] += 1
    assert bool((cover == 1).all()), "pieces must cover every index exactly once"
    return out


class CountingCollectives(Collectives):
    """Delegates to ``inner`` and counts the all-reduce calls (the topology update's latency cost)."""

    def __init__(self, inner: Collectives | None = None) -> None:
        self.inner = inner or Collectives()
        self.rank, self.world_size = self.inner.rank, self.inner.world_size
        self.calls = 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner.all_reduce_sum(t)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner.all_reduce_max(t)


def max_rounds(sizes: list[int]) -> int:
    """The documented bound: one count all-reduce, 4 score bytes, then the index bytes."""
    return 1 + 4 + max(((max(s - 1, 0)).bit_length() + 7) // 8 for s in sizes)
