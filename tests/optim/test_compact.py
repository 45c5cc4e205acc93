"""Single-process tests of the compact optimizers: arithmetic, blocking, re-compaction, state round trip."""

from __future__ import annotations

import copy

import pytest
import torch

from dimred_dist.optim import CompactAdamW, CompactSGD
from dimred_dist.optim.compact import pack_bits, unpack_bits

N = 203  # not a multiple of 8 or of any block size below


def _mask(seed: int, density: float, n: int = N) -> torch.Tensor:
    m = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < density
    # blocks of 16 that are all TRAIN, all not TRAIN, and mixed
    m[16:48] = True
    m[64:96] = False
    return m


def _grads(steps: int, n: int = N) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(n, generator=g) for _ in range(steps)]


def _run(opt_cls, kwargs, mask, grads, block=None, init=None):
    p = torch.nn.Parameter(init.clone() if init is not None else torch.randn(N, generator=torch.Generator().manual_seed(1)))
    opt = opt_cls([p], **kwargs)
    if block is not None:
        opt.block_numel = block
    opt.set_train_mask(p, mask)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach().clone(), opt


def _reference(torch_cls, kwargs, mask, grads, init):
    """torch's own optimizer on the TRAIN entries only."""
    q = torch.nn.Parameter(init[mask].clone())
    opt = torch_cls([q], **kwargs)
    for g in grads:
        q.grad = g[mask].clone()
        opt.step()
    return q.detach()


ADAMW = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
SGD = dict(lr=1e-2, momentum=0.9, weight_decay=0.01)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("block", [8, 16, 40, 1 << 20])
def test_adamw_matches_torch_adamw_on_train_entries(density, block):
    mask, grads = _mask(0, density), _grads(5)
    init = torch.randn(N, generator=torch.Generator().manual_seed(1))
    got, _ = _run(CompactAdamW, ADAMW, mask, grads, block=block, init=init)
    ref = _reference(torch.optim.AdamW, ADAMW, mask, grads, init)
    torch.testing.assert_close(got[mask], ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(got[~mask], init[~mask]), "an entry that is not TRAIN was written"


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("block", [8, 1 << 20])
def test_sgd_matches_torch_sgd_on_train_entries(nesterov, block):
    kwargs = dict(SGD, nesterov=nesterov)
    mask, grads = _mask(2, 0.3), _grads(4)
    init = torch.randn(N, generator=torch.Generator().manual_seed(1))
    got, _ = _run(CompactSGD, kwargs, mask, grads, block=block, init=init)
    ref = _reference(torch.optim.SGD, kwargs, mask, grads, init)
    torch.testing.assert_close(got[mask], ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(got[~mask], init[~mask])


@pytest.mark.parametrize("opt_cls,kwargs", [(CompactAdamW, ADAMW), (CompactSGD, SGD)])
def test_blocking_does_not_change_a_bit(opt_cls, kwargs):
    mask, grads = _mask(3, 0.4), _grads(6)
    whole, opt_a = _run(opt_cls, kwargs, mask, grads, block=1 << 20)
    for block in (8, 24, 64, 200):
        blocked, opt_b = _run(opt_cls, kwargs, mask, grads, block=block)
        assert torch.equal(whole, blocked), block
        for k in opt_cls.moment_names:
            (sa,), (sb,) = opt_a.state.values(), opt_b.state.values()
            assert torch.equal(sa[k], sb[k]), (block, k)


def test_recompaction_keeps_survivors_and_zeroes_regrown_moments():
    init = torch.randn(N, generator=torch.Generator().manual_seed(1))
    p = torch.nn.Parameter(init.clone())
    opt = CompactAdamW([p], **ADAMW)
    opt.block_numel = 16
    old = _mask(4, 0.5)
    opt.set_train_mask(p, old)
    for g in _grads(3):
        p.grad = g
        opt.step()
    st = opt.state[p]
    full_old = torch.zeros(N)
    full_old[old] = st["exp_avg"]
    new = _mask(5, 0.5)
    reset = torch.zeros(N, dtype=torch.bool)
    reset[(old & new).nonzero()[:3, 0]] = True  # dropped and regrown in one update
    opt.set_train_mask(p, new, reset=reset)
    full_new = torch.zeros(N)
    full_new[new] = opt.state[p]["exp_avg"]
    keep = old & new & ~reset
    assert torch.equal(full_new[keep], full_old[keep])
    assert bool((full_new[new & ~keep] == 0).all())
    assert opt.state[p]["exp_avg"].numel() == int(new.sum())
    assert torch.equal(opt.train_mask(p), new)
    before = p.detach().clone()
    p.grad = torch.ones(N)
    opt.step()
    assert torch.equal(p.detach()[~new], before[~new])


def test_state_dict_round_trip_is_exact():
    mask, grads = _mask(6, 0.3), _grads(4)
    init = torch.randn(N, generator=torch.Generator().manual_seed(1))
    p_a, opt_a = _run(CompactAdamW, ADAMW, mask, grads[:2], block=16, init=init)
    q = torch.nn.Parameter(p_a.clone())
    opt_b = CompactAdamW([q], **ADAMW)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.state[q]["mask_bits"].dtype == torch.uint8
    (pa,) = opt_a.param_groups[0]["params"]
    for g in grads[2:]:
        pa.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(pa.detach(), q.detach())


def test_state_bytes_are_the_train_entries_plus_one_bit_per_entry():
    n = 8000
    mask = torch.zeros(n, dtype=torch.bool)
    mask[::10] = True
    p = torch.nn.Parameter(torch.randn(n))
    opt = CompactAdamW([p])
    opt.set_train_mask(p, mask)
    p.grad = torch.randn(n)
    opt.step()
    assert opt.state_bytes() == 2 * 4 * (n // 10) + n // 8 + 4


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_pack_unpack_round_trip(n):
    m = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
    bits = pack_bits(m)
    assert bits.dtype == torch.uint8 and bits.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(bits, n), m)


def test_wrong_mask_length_and_bad_hyper_parameters_are_refused():
    p = torch.nn.Parameter(torch.zeros(10))
    with pytest.raises(ValueError, match="11 entries"):
        CompactAdamW([p]).set_train_mask(p, torch.ones(11, dtype=torch.bool))
    with pytest.raises(ValueError, match="AdamW"):
        CompactAdamW([p], lr=-1)
    with pytest.raises(ValueError, match="Nesterov"):
        CompactSGD([p], nesterov=True, momentum=0.0)
