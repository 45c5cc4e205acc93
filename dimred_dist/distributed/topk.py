"""Exact top-k over scores split across ranks, with a few small all-reduces of counts.

Each selection *group* (a layer, or all layers for a global budget) has a flat index space
``0 .. size-1``; each rank holds any number of contiguous *segments* of it. Every element gets a
unique key ``(score, size - 1 - index)`` compared lexicographically, so larger scores win and ties
go to the lowest global index. A radix select over the key's bytes, most significant first, finds
the k largest keys of every group at once: each round all-reduces one 256-bin histogram per
unresolved group, and a group is finished as soon as all its remaining candidates are either in
or out. A float32 key has 4 bytes and an index at most ``ceil(log2(size) / 8)``, so a group takes at
most 4 + 4 rounds for sizes below 2**32. No score, weight or mask tensor crosses the network.

Scores are compared as float32 (``-0.0 == 0.0``, NaN is an error) or, for integer tensors, as
unsigned 32-bit integers. The result is bit-identical to :func:`reference_topk_mask`, a stable sort
of the full tensor in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dimred_dist.distributed.collectives import Collectives

_U32 = 1 << 32


@dataclass
class Segment:
    """A contiguous piece of one selection group held by this rank.

    Attributes:
        group: Index of the selection group.
        start: Global index (in the group's index space) of ``scores[0]``.
        scores: 1-D local scores.
        eligible: Optional bool mask; ineligible entries are never selected.
    """

    group: int
    start: int
    scores: torch.Tensor
    eligible: torch.Tensor | None = None


def score_keys(scores: torch.Tensor) -> torch.Tensor:
    """Order-preserving map of scores to integers in ``[0, 2**32)`` (int64)."""
    scores = scores.detach().reshape(-1)
    _check_scores(scores)
    return _keys32(scores).to(torch.int64) + (1 << 31)


def _keys32(scores: torch.Tensor) -> torch.Tensor:
    """:func:`score_keys` minus ``2**31`` as int32 (the same order in half the bytes), unchecked."""
    if scores.dtype.is_floating_point:
        keys = (scores.detach().reshape(-1).to(torch.float32) + 0.0).view(torch.int32)  # a copy; -0.0 -> +0.0
        # IEEE floats order like sign-magnitude integers: flip the magnitude bits of negative ones
        keys ^= (keys >> 31) & 0x7FFFFFFF
        return keys
    return (scores.detach().reshape(-1).to(torch.int64) - (1 << 31)).to(torch.int32)


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dtype.is_floating_point:
        if bool(torch.isnan(scores).any()):
            raise ValueError("scores contain NaN; a NaN cannot be ranked")
    elif scores.numel() and (int(scores.min()) < 0 or int(scores.max()) >= _U32):
        raise ValueError("integer scores must lie in [0, 2**32)")


def _index_bytes(size: int) -> int:
    return (max(size - 1, 0).bit_length() + 7) // 8


class _SegState:
    """Selection state of one segment: kept and candidate masks (1 byte per entry each).

    Keys are not stored: a round computes the digit it needs from the scores, for every entry of
    the segment while at least 1/8 of them are candidates (no index arrays), else for the
    candidates' positions only.
    """

    def __init__(self, seg: Segment, size: int) -> None:
        self.seg = seg
        self.scores = seg.scores.reshape(-1)
        _check_scores(self.scores)
        n = self.scores.numel()
        if seg.start < 0 or seg.start + n > size:
            raise ValueError(f"segment [{seg.start}, {seg.start + n}) outside group {seg.group} of size {size}")
        self.size = size
        device = self.scores.device
        self.kept = torch.zeros(n, dtype=torch.bool, device=device)
        self.cand = (
            torch.ones(n, dtype=torch.bool, device=device)
            if seg.eligible is None
            else seg.eligible.reshape(-1).to(device, torch.bool).clone()
        )
        self.ncand = int(self.cand.sum())

    def digits(self, d: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Byte ``d`` (most significant first) of the composite keys, as uint8.

        Returns ``(None, digits of every entry)`` while candidates are many, else ``(positions of
        the candidates, their digits)``.
        """
        n = self.kept.numel()
        pos = None if self.ncand * 8 >= n else self.cand.nonzero().squeeze(1)
        if d < 4:
            keys = _keys32(self.scores if pos is None else self.scores[pos])
            shift = 8 * (3 - d)
            dig = (keys >> shift) if shift else keys
            dig &= 255
            if d == 0:
                dig ^= 128  # the sign bit of the int32 key is the top bit of the unsigned one
            return pos, dig.to(torch.uint8)
        nib, j = _index_bytes(self.size), d - 4
        m = n if pos is None else pos.numel()
        if j >= nib:
            return pos, torch.zeros(m, dtype=torch.uint8, device=self.kept.device)
        if pos is None:
            dtype = torch.int32 if self.size < (1 << 31) else torch.int64
            pos_or_all = torch.arange(n, dtype=dtype, device=self.kept.device)
        else:
            pos_or_all = pos
        ikey = (self.size - 1 - self.seg.start) - pos_or_all
        return pos, ((ikey >> (8 * (nib - 1 - j))) & 255).to(torch.uint8)

    def narrow(self, pos: torch.Tensor | None, dig: torch.Tensor, b: int, count: int) -> None:
        """Keep candidates whose digit is above ``b``, drop those below; ``count`` remain."""
        if pos is None:
            self.kept |= self.cand & (dig > b)
            self.cand &= dig == b
        else:
            self.kept[pos[dig > b]] = True
            self.cand[pos[dig != b]] = False
        self.ncand = count


def exact_topk_masks(
    segments: list[Segment], sizes: list[int], ks: list[int], coll: Collectives | None = None
) -> list[torch.Tensor]:
    """Local bool masks (one per segment) of the ``ks[g]`` largest keys of every group ``g``.

    Args:
        segments: This rank's pieces of the groups (may be empty, may hold several per group).
        sizes: Global size of every group's index space (identical on all ranks).
        ks: Number of entries to select in every group (identical on all ranks).
        coll: Collectives over the ranks holding the pieces; ``None`` for a single process.

    Raises:
        ValueError: If a ``k`` is negative or larger than the number of eligible entries.
    """
    coll = coll or Collectives()
    n_groups = len(sizes)
    if len(ks) != n_groups:
        raise ValueError(f"{len(ks)} values of k for {n_groups} groups")
    states = [_SegState(s, sizes[s.group]) for s in segments]
    local = torch.zeros(n_groups, dtype=torch.int64)
    for st in states:
        local[st.seg.group] += st.ncand
    ncand = coll.all_reduce_sum(local).tolist()
    need = list(ks)
    for g in range(n_groups):
        if not 0 <= need[g] <= ncand[g]:
            raise ValueError(f"group {g}: cannot select k={need[g]} of {ncand[g]} eligible entries")
    active = _resolve(states, need, ncand, range(n_groups))
    n_digits = 4 + max((_index_bytes(s) for s in sizes), default=0)
    for d in range(n_digits):
        if not active:
            break
        row = {g: i for i, g in enumerate(active)}
        hist = torch.zeros(len(active), 256, dtype=torch.int64)
        cache = []
        for st in states:
            if st.seg.group in row:
                pos, dig = st.digits(d)
                counts = torch.bincount((dig if pos is not None else dig[st.cand]).cpu(), minlength=256)
                hist[row[st.seg.group]] += counts
                cache.append((st, pos, dig, counts))
        hist = coll.all_reduce_sum(hist)
        rev = hist.flip(1).cumsum(1)
        chosen: dict[int, int] = {}
        for g, i in row.items():
            j = int(torch.searchsorted(rev[i], torch.tensor(need[g]), right=False))
            chosen[g] = 255 - j
            need[g] -= int(rev[i, j] - hist[i, 255 - j])
            ncand[g] = int(hist[i, 255 - j])
        for st, pos, dig, counts in cache:
            b = chosen[st.seg.group]
            st.narrow(pos, dig, b, int(counts[b]))
        active = _resolve(states, need, ncand, active)
    if active:
        raise RuntimeError(f"radix select left groups {active} unresolved; keys are not unique")
    return [st.kept for st in states]


def _resolve(states: list[_SegState], need: list[int], ncand: list[int], groups) -> list[int]:
    """Finish groups whose remaining candidates are all in (need == ncand) or all out (need == 0)."""
    still = []
    for g in groups:
        if need[g] == 0 or need[g] == ncand[g]:
            for st in states:
                if st.seg.group == g:
                    if need[g]:
                        st.kept |= st.cand
                    st.cand.zero_()
                    st.ncand = 0
        else:
            still.append(g)
    return still


def reference_topk_mask(scores: torch.Tensor, k: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Single-process reference: a stable descending sort of the whole flattened tensor."""
    keys = score_keys(scores)
    if eligible is not None:
        keys = torch.where(eligible.reshape(-1), keys, torch.full_like(keys, -1))
    order = torch.sort(keys, descending=True, stable=True).indices
    mask = torch.zeros(keys.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    if eligible is not None and bool((mask & ~eligible.reshape(-1)).any()):
        raise ValueError(f"cannot select k={k} of {int(eligible.sum())} eligible entries")
    return mask
