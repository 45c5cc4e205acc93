"""Bit-packed masks: the byte layout written out by hand, round trips at every padding, counts."""

import pytest
import torch

from dimred_dist.core.bits import count_bits, pack_bits, pack_into, packed_size, unpack_bits
from dimred_dist.core.state import ParamState


def test_layout_by_hand():
    # entry i is bit i % 8 of byte i // 8; bits past n are 0
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    assert pack_bits(mask).tolist() == [0b10001101, 0b00000110]
    assert pack_bits(torch.ones(8, dtype=torch.bool)).tolist() == [255]
    assert pack_bits(torch.zeros(0, dtype=torch.bool)).numel() == 0


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 1000, 4099])
def test_round_trip_and_count(n):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < 0.3
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == packed_size(n) == (n + 7) // 8
    assert torch.equal(unpack_bits(bits, n), mask)
    assert count_bits(bits) == int(mask.sum())
    ref = [sum(int(mask[8 * b + k]) << k for k in range(8) if 8 * b + k < n) for b in range(packed_size(n))]
    assert bits.tolist() == ref


def test_pack_into_keeps_the_tensor():
    out = torch.zeros(2, dtype=torch.uint8)
    ref = out
    pack_into(out, torch.tensor([1] * 9 + [0], dtype=torch.bool))
    assert out is ref and out.tolist() == [255, 1]
    with pytest.raises(ValueError, match="10 entries need 2 bytes, got 3"):
        pack_into(torch.zeros(3, dtype=torch.uint8), torch.zeros(10, dtype=torch.bool))


def test_param_state_holds_two_bits_per_entry():
    n = 1001
    ps = ParamState.dense("w", (n,), 0, n)
    assert ps.keep_bits.dtype == torch.uint8 and ps.keep_bits.numel() == 126
    assert ps.nbytes() == 2 * 126
    keep = torch.arange(n) % 3 != 0
    train = torch.arange(n) % 2 == 0
    ps.set_masks(keep, train)
    assert torch.equal(ps.keep, keep) and torch.equal(ps.train, train & keep)
    assert torch.equal(ps.freeze_mask(), keep & ~train) and torch.equal(ps.prune_mask(), ~keep)
    c = ps.counts()
    assert (c[0], c[1], c[2]) == (int((train & keep).sum()), int((keep & ~train).sum()), int((~keep).sum()))
    # a write into the unpacked copy changes nothing: masks change only through the setters
    ps.keep.fill_(False)
    assert torch.equal(ps.keep, keep)
