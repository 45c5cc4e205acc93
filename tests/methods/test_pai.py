"""Pruning at initialization: hand-worked scores and masks, an independent reference for the iterative
methods, GraSP's two Hessian-vector products, SynFlow's restoration and range, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dimred_dist as dd
from dimred_dist import DimRedManager, ProbeData


def _recipe(method: str, sparsity: float = 0.5, **args) -> dd.Recipe:
    return dd.load_recipe({"method": method, "sparsity": sparsity, "distribution": "global", "args": args})


def _half_squared_error(model, batch, temperature: float = 1.0) -> torch.Tensor:
    x, y = batch
    return 0.5 * ((model(x) / temperature - y) ** 2).sum()


def _linear(w) -> nn.Module:
    m = nn.Linear(len(w[0]), len(w), bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(w))
    return m


# One sample x = [1, 2], target y = [0, 1], loss 0.5 * |W x - y|^2 with W = [[4, -1], [3, -3]]:
# W x = [2, -3], residual r = [2, -4], gradient g = r x^T = [[2, 4], [-4, -8]].
W_HAND = [[4.0, -1.0], [3.0, -3.0]]
BATCH = (torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]]))


def test_snip_hand_worked():
    """|W * g| = [[8, 4], [12, 24]]: the two largest are 24 and 12 (the second row)."""
    model = _linear(W_HAND)
    scores = dd.score_entries(_recipe("snip"), model, [BATCH], loss_fn=_half_squared_error)
    assert scores["weight"].tolist() == [[8.0, 4.0], [12.0, 24.0]]
    mgr = DimRedManager(_recipe("snip"), model).prepare(probe=ProbeData([BATCH], _half_squared_error))
    assert mgr.state["weight"].keep.reshape(2, 2).tolist() == [[False, False], [True, True]]
    assert model.weight.tolist() == [[0.0, 0.0], [3.0, -3.0]]


def test_snip_sums_gradients_over_batches_before_the_absolute_value():
    """Two batches whose gradients cancel on the first row: Synaptic-Flow's |w * (g1 + g2)|, not a sum of |.|."""
    b2 = (torch.tensor([[1.0, 2.0]]), torch.tensor([[4.0, 1.0]]))  # residual [-2, -4]: row 0's gradient flips
    scores = dd.score_entries(_recipe("snip", batches=2), _linear(W_HAND), [BATCH, b2], loss_fn=_half_squared_error)
    assert scores["weight"].tolist() == [[0.0, 0.0], [24.0, 48.0]]


def test_grasp_hand_worked():
    """The Hessian of the loss for row i is x x^T, so H g = |x|^2 g = 5 g and the kept score w * Hg is
    [[40, -20], [-60, 120]]: GraSP keeps 120 and 40 (SNIP's |.| would keep 120 and 60)."""
    model = _linear(W_HAND)
    for hvp in ("double_backward", "finite_difference"):
        recipe = _recipe("grasp", temperature=1.0, hvp=hvp)
        scores = dd.score_entries(recipe, model, [BATCH], loss_fn=_half_squared_error)
        torch.testing.assert_close(scores["weight"], torch.tensor([[40.0, -20.0], [-60.0, 120.0]]),
                                   rtol=1e-3 if hvp == "finite_difference" else 0, atol=1e-3)
    mgr = DimRedManager(_recipe("grasp", temperature=1.0), model).prepare(probe=ProbeData([BATCH], _half_squared_error))
    assert mgr.state["weight"].keep.reshape(2, 2).tolist() == [[True, False], [False, True]]


def _synflow_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
        net[2].weight.copy_(torch.tensor([[-1.0, 2.0]]))
    return net


def test_synflow_hand_worked():
    """R = 1^T |W2| |W1| 1 on an all-ones input: h = |W1| 1 = [3, 3.5]; score(W1[i, j]) = |W1[i, j]| |W2[i]|
    = [[1, 2], [6, 1]], score(W2[i]) = |W2[i]| h[i] = [3, 7]. One round keeps 7, 6 and 3. Two rounds
    (density 0.5 ** (1/2) then 0.5) keep 4 of 6 first (7, 6, 3, 2), then with the pruned weights at 0:
    h = [2, 3], scores [[0, 2], [6, 0]] and [2, 6] -> 6, 6, and 2 twice; the lower flat index wins the tie."""
    one = dd.score_entries(_recipe("synflow", rounds=1), _synflow_net(), input_shape=(2,))
    assert one["0.weight"].tolist() == [[1.0, 2.0], [6.0, 1.0]] and one["2.weight"].tolist() == [[3.0, 7.0]]
    data = ProbeData([], input_shape=(2,))
    m1 = DimRedManager(_recipe("synflow", rounds=1), _synflow_net()).prepare(probe=data)
    assert m1.state["0.weight"].keep.tolist() == [False, False, True, False]
    assert m1.state["2.weight"].keep.tolist() == [True, True]
    m2 = DimRedManager(_recipe("synflow", rounds=2), _synflow_net()).prepare(probe=data)
    assert m2.state["0.weight"].keep.tolist() == [False, True, True, False]
    assert m2.state["2.weight"].keep.tolist() == [False, True]


# ---- iterative SNIP and FORCE against an independent reference -----------------------------------
def _reference_progressive(model: nn.Module, batches, density: float, rounds: int, revive: bool):
    """de Jorge et al.'s Algorithm 1 on a global budget, written with torch.func (not the package's code):
    each round the gradient at the pruned network w0 * mask (averaged over batches), scores |w0 * g|, top-k of
    all entries (FORCE) or of the kept ones (Iterative SNIP); ties to the lower flat index."""
    names = [n for n, p in model.named_parameters() if n.endswith("weight")]
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = {n: torch.ones_like(w0[n], dtype=torch.bool) for n in names}
    sizes = [w0[n].numel() for n in names]
    for t in range(rounds):
        def loss(ws):
            return sum(F.cross_entropy(torch.func.functional_call(model, {**w0, **ws}, (x,)), y) for x, y in batches)

        # the gradient at the pruned network, for every entry (pruned ones included)
        grads = torch.func.grad(loss)({n: w0[n] * mask[n] for n in names})
        scores = torch.cat([(w0[n] * grads[n] / len(batches)).abs().reshape(-1) for n in names])
        kept = torch.cat([mask[n].reshape(-1) for n in names])
        eligible = torch.ones_like(kept) if revive else kept
        d = density ** ((t + 1) / rounds)
        k = sum(round(d * s) for s in sizes)
        order = sorted((i for i in range(scores.numel()) if eligible[i]), key=lambda i: (-float(scores[i]), i))
        keep = torch.zeros(scores.numel(), dtype=torch.bool)
        keep[order[:k]] = True
        mask = dict(zip(names, (m.reshape(w0[n].shape) for n, m in zip(names, keep.split(sizes)))))
    return mask


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))


def _ce(model, batch, temperature: float = 1.0):
    x, y = batch
    return F.cross_entropy(model(x) / temperature, y)


@pytest.mark.parametrize("method,revive", [("iter_snip", False), ("force", True)])
def test_progressive_pruning_matches_the_reference(method, revive):
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
    model = _mlp()
    expected = _reference_progressive(_mlp(), batches, 0.2, 5, revive)
    mgr = DimRedManager(_recipe(method, 0.8, batches=2, rounds=5), model).prepare(probe=ProbeData(batches, _ce))
    for n, m in expected.items():
        assert torch.equal(mgr.state[n].keep, m.reshape(-1)), n


def test_force_lets_pruned_weights_come_back_and_iterative_snip_does_not():
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
    early = _reference_progressive(_mlp(), batches, 0.2 ** 0.2, 1, True)  # FORCE's first round (of five)
    force = _reference_progressive(_mlp(), batches, 0.2, 5, True)
    snip = _reference_progressive(_mlp(), batches, 0.2, 5, False)
    revived = sum(int((force[n] & ~early[n]).sum()) for n in force)
    assert revived > 0, "some entry pruned in round 1 is back at the end: the rules differ on this data"
    assert all(not bool((snip[n] & ~early[n]).any()) for n in snip)


# ---- GraSP: double backward and finite differences agree ---------------------------------------
def test_grasp_hessian_products_agree_on_a_small_model():
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]
    exact = dd.score_entries(_recipe("grasp", batches=2, hvp="double_backward"), _mlp(), batches, loss_fn=_ce)
    fd = dd.score_entries(_recipe("grasp", batches=2, hvp="finite_difference"), _mlp(), batches, loss_fn=_ce)
    agree = total = 0
    for n in exact:
        scale = float(exact[n].abs().max())
        assert float((exact[n] - fd[n]).abs().max()) <= 1e-2 * scale, n
    m_exact = DimRedManager(_recipe("grasp", 0.8, batches=2, hvp="double_backward"), _mlp()).prepare(
        probe=ProbeData(batches, _ce))
    m_fd = DimRedManager(_recipe("grasp", 0.8, batches=2, hvp="finite_difference"), _mlp()).prepare(
        probe=ProbeData(batches, _ce))
    for n in exact:
        agree += int((m_exact.state[n].keep == m_fd.state[n].keep).sum())
        total += m_exact.state[n].keep.numel()
    assert agree / total >= 0.98, f"masks agree on {agree} of {total} entries"


# ---- SynFlow: restoration and range ----------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def test_synflow_restores_every_tensor_bit_for_bit():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    with torch.no_grad():
        net[0].weight[0, 0] = -0.0  # a negative zero must come back as one
        net[1].running_mean.uniform_(-1, 1)
        net[1].weight.uniform_(-2, 2)
    net[3].bias.requires_grad_(False)  # a frozen tensor is made positive and restored too
    before = {n: t.detach().clone() for n, t in net.state_dict().items()}
    mgr = DimRedManager(_recipe("synflow", 0.6, rounds=5), net).prepare(probe=ProbeData([], input_shape=(5,)))
    after = net.state_dict()
    for n, t in before.items():
        if n in mgr.views:
            keep = mgr.state[n].keep
            assert torch.equal(_bits(after[n])[keep], _bits(t)[keep]), n
            assert bool((after[n].reshape(-1)[~keep] == 0).all()), n
        elif t.is_floating_point():
            assert torch.equal(_bits(after[n]), _bits(t)), f"{n} is not restored bit for bit"
    assert net.training and next(net.parameters()).dtype == torch.float32


def _deep_mlp(depth: int = 48, width: int = 256) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for i in range(depth):
        layers += [nn.Linear(16 if i == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def test_synflow_does_not_overflow_on_a_48_layer_mlp():
    """|W| row sums of Kaiming-uniform 256-wide layers are about 8: R ~ 8 ** 48 ~ 1e43, beyond float32."""
    mgr = DimRedManager(_recipe("synflow", 0.9, rounds=4), _deep_mlp()).prepare(probe=ProbeData([], input_shape=(16,)))
    dens = [mgr.metrics()[f"dimred/density/{n}"] for n in mgr.views]
    assert mgr.metrics()["dimred/density"] == pytest.approx(0.1, abs=1e-3)
    assert all(d > 0 for d in dens), "every layer keeps entries (SynFlow avoids layer collapse)"
    with pytest.raises(ValueError, match="synflow overflowed in torch.float32"):
        DimRedManager(_recipe("synflow", 0.9, rounds=1, precision="model"), _deep_mlp()).prepare(
            probe=ProbeData([], input_shape=(16,)))


# ---- bad input: one line naming the value, before any weight changes ---------------------------------
def _unchanged(model: nn.Module, before: dict) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("method", ["snip", "grasp", "iter_snip", "force"])
def test_data_methods_without_data_fail_before_any_weight_changes(method):
    model = _mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=f"{method} scores entries on data, but no probe data was given"):
        DimRedManager(_recipe(method), model).prepare()
    assert _unchanged(model, before)


def test_a_probe_without_gradient_is_refused():
    model = _mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,)))]
    with pytest.raises(ValueError, match="the probe batches give no gradient"):
        DimRedManager(_recipe("snip"), model).prepare(probe=ProbeData(batches, lambda m, b: m(b[0]).sum() * 0.0))
    assert _unchanged(model, before)


@pytest.mark.parametrize("args,match", [
    ({"batches": 0}, "batches must be an integer >= 1, got 0"),
    ({"batches": True}, "batches must be an integer >= 1, got True"),
    ({"rounds": 0}, "rounds must be an integer >= 1, got 0"),
])
def test_probe_counts_are_validated(args, match):
    with pytest.raises(ValueError, match=match):
        _recipe("force", **args)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        _recipe("grasp", temperature=0)
    with pytest.raises(ValueError, match="hvp must be"):
        _recipe("grasp", hvp="exact")
    with pytest.raises(ValueError, match="precision must be"):
        _recipe("synflow", precision="fp16")


def test_too_few_batches_and_missing_shapes():
    model = _mlp()
    with pytest.raises(ValueError, match="snip needs 3 probe batches, got 1"):
        DimRedManager(_recipe("snip", batches=3), model).prepare(
            probe=ProbeData([(torch.randn(2, 6), torch.zeros(2).long())]))
    with pytest.raises(ValueError, match="synflow needs the shape of one input"):
        DimRedManager(_recipe("synflow"), model).prepare(probe=ProbeData([]))
    with pytest.raises(TypeError, match="the probe loss_fn takes no `temperature`"):
        DimRedManager(_recipe("grasp"), model).prepare(
            probe=ProbeData([(torch.randn(2, 6), torch.zeros(2).long())], lambda m, b: F.cross_entropy(m(b[0]), b[1])))
