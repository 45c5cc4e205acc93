"""The optimizer side under real DeepSpeed ZeRO-1/2/3 engines (2 gloo ranks on CPU, fp32 and bf16).

* CompactAdamW's update of TRAIN entries equals ``torch.optim.AdamW`` on those entries, fed the
  gradients DeepSpeed handed the client optimizer (once per param group under ZeRO-1/2, once per
  sub-group under ZeRO-3), with a static topology and across RigL / SET updates (surviving
  entries keep their moments, regrown ones restart at zero);
* DeepSpeed's gradient norm (what it clips with) is the norm of the masked gradient;
* optimizer state per rank is at most ``(density + 0.02)`` of dense AdamW's 8 bytes per entry;
* set-ups the manager cannot serve fail in ``attach_to_engine``, before any step, hook nothing and
  change no weight;
* whole-tensor freezing before ``deepspeed.initialize`` allocates no fp32 master or state for it;
* no launch leaves a DeepSpeed shared-memory file in ``/dev/shm``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from tests.distributed.zero_scenarios import ADAMW_GROUPS, CASE_IDS, CASES, T_ADAMW, T_DYN, setup, suite
from tests.zero_utils import PRECISIONS, STAGES, Net, launch_results, make_model, scenario

pytestmark = pytest.mark.distributed


def _flat_masks(r: dict, local: dict[str, torch.Tensor], fill: bool) -> list[torch.Tensor]:
    """Per flat partition of one rank: ``local[name]`` over each view's slice, ``fill`` elsewhere."""
    masks = [torch.full((n,), fill, dtype=torch.bool) for n in r["flat_numels"]]
    for name, (flat, offset) in r["flat_of"].items():
        n = r["local_numel"][name]
        if n:
            masks[flat][offset : offset + n] = local[name] if name in local else fill
    return masks


def check_client_steps(r: dict, rank: int, topology: dict[int, tuple[dict, dict]]) -> int:
    """Replay one rank's client optimizer steps with ``torch.optim.AdamW`` on the TRAIN entries.

    ``topology[step]`` = (local train masks, local regrown masks) from ``step`` on. The reference
    keeps dense moments: an entry that leaves TRAIN loses them, a regrown one restarts at zero,
    the others carry on. ZeRO's alignment padding is skipped. Returns the number of sparse steps.
    """
    real = r["real"]
    managed = _flat_masks(r, {n: torch.ones(k, dtype=torch.bool) for n, k in r["local_numel"].items()}, False)
    moments = {i: (torch.zeros(n), torch.zeros(n)) for i, n in enumerate(r["flat_numels"])}
    count = dict.fromkeys(range(len(r["flat_numels"])), 0)
    last: dict[int, torch.Tensor] = {}
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # flat: (kept through, regrown) since its last call
    mask: list[torch.Tensor] = []
    sparse = 0
    # a step with a topology change may have no client update (skipped): replay the change all the same
    for t in sorted({c["step"] for c in r["calls"]} | set(topology)):
        if t in topology:  # a topology change before this step's client update
            old = mask
            mask = _flat_masks(r, topology[t][0], True)  # unmanaged entries train
            regrown = _flat_masks(r, topology[t][1], False)
            for i, (m, v) in moments.items():
                for buf in (m, v):
                    buf[~mask[i] | regrown[i]] = 0
            for i in range(len(old)):
                through, grown = pending.get(i, (old[i], torch.zeros_like(old[i])))
                pending[i] = (through & old[i] & mask[i] & ~regrown[i], grown | regrown[i])
        for c in (c for c in r["calls"] if c["step"] == t):
            i, h = c["flat"], c["hyper"]
            where = f"rank {rank} flat {i} step {t}"
            got = mask[i] if c["mask"] is None else c["mask"]
            assert torch.equal(got, mask[i]), f"{where}: optimizer mask != the manager's TRAIN mask"
            sel = mask[i] & real[i]
            grad, before, after = c["grad"], c["before"], c["after"]
            assert grad.dtype == before.dtype == torch.float32
            assert bool((grad[real[i] & ~mask[i]] == 0).all()), f"{where}: non-TRAIN gradients reach the optimizer"
            assert bool((grad[sel] != 0).any()) or not bool(sel.any()), f"{where}: no gradient"
            change = pending.pop(i, None)
            if i in last:
                kept = real[i] & (change[0] if change is not None else True)
                assert torch.equal(before[kept], last[i][kept]), f"{where}: the master changed between steps"
                if change is not None:
                    zero = real[i] & managed[i] & (~mask[i] | change[1])
                    assert bool((before[zero] == 0).all()), f"{where}: pruned or regrown entries are not 0"
            p = torch.nn.Parameter(before[sel].clone())
            ref = torch.optim.AdamW([p], lr=h["lr"], betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"],
                                    foreach=False)
            m, v = moments[i]
            ref.state[p] = {"step": torch.tensor(float(count[i])), "exp_avg": m[sel].clone(),
                            "exp_avg_sq": v[sel].clone()}
            p.grad = grad[sel].clone()
            ref.step()
            count[i] += 1
            m[sel], v[sel] = ref.state[p]["exp_avg"], ref.state[p]["exp_avg_sq"]
            torch.testing.assert_close(after[sel], p.detach(), rtol=1e-6, atol=1e-7, msg=lambda msg: f"{where}: {msg}")
            other = real[i] & ~mask[i]
            assert torch.equal(after[other], before[other]), f"{where}: non-TRAIN entries moved"
            last[i] = after
            sparse += int(not bool(mask[i].all()))
    for name, (flat, offset) in r["flat_of"].items():
        n = r["local_numel"][name]
        if n:
            assert bool(real[flat][offset : offset + n].all()), f"{name}: its view covers padding"
    return sparse


# ---- 3. optimizer equivalence ----------------------------------------------------------------
@pytest.mark.parametrize(("stage", "precision"), CASES, ids=CASE_IDS)
def test_compact_adamw_update_equals_torch_adamw_on_train_entries(stage, precision):
    """Static topology, two param groups with different hyper-parameters."""
    ranks = scenario(suite(stage, precision), "adamw")
    sparse = owned = 0
    for rank, r in enumerate(ranks):
        assert r["inner_is_client"], "the client optimizer DeepSpeed drives is the manager's optimizer"
        n_flats = len(r["flat_numels"])
        if stage == 3:
            assert n_flats >= 3, "sub_group_size=100 must give several ZeRO-3 sub-groups"
        else:
            assert n_flats == 2, "one flat partition per param group"
        per_step = [sum(c["step"] == t for c in r["calls"]) for t in range(T_ADAMW)]
        assert per_step == [n_flats] * T_ADAMW, f"rank {rank}: client steps per optimizer step {per_step}"
        assert {c["hyper"]["lr"] for c in r["calls"]} == {g["lr"] for g in ADAMW_GROUPS}
        owned += sum(int(x.sum()) for x in r["real"])
        train = {n: m[1] for n, m in r["masks"].items()}
        sparse += check_client_steps(r, rank, {0: (train, {})})
        for name, (flat, offset) in r["flat_of"].items():
            n = r["local_numel"][name]
            if n:
                keep = r["masks"][name][0]
                final = [c for c in r["calls"] if c["flat"] == flat][-1]["after"]
                assert bool((final[offset : offset + n][~keep] == 0).all()), f"PRUNE entries of {name} not 0"
    assert sparse > 0, "some flat partition must hold pruned entries"
    assert owned == sum(p.numel() for p in make_model(Net).parameters()), "each entry lies in one rank's partition"


@pytest.mark.parametrize("method", ["rigl", "set"])
@pytest.mark.parametrize(("stage", "precision"), CASES, ids=CASE_IDS)
def test_compact_adamw_across_topology_updates(stage, precision, method):
    """RigL / SET: surviving entries keep their moments, new connections restart at zero, update steps apply
    no client step, and the masters do not move across them (vs torch AdamW)."""
    ranks = scenario(suite(stage, precision), method)
    for rank, r in enumerate(ranks):
        assert r["inner_is_client"]
        topology = {0: ({n: m[1] for n, m in r["init"].items()}, {})}
        for u in r["updates"]:
            topology[u["step"]] = ({n: a["train"] for n, a in u["after"].items()},
                                   {n: a["regrown"] for n, a in u["after"].items()})
        assert len(topology) == 4
        assert check_client_steps(r, rank, topology) > 0
        # RigL's rule: no optimizer step on a step whose topology just changed
        assert sorted({c["step"] for c in r["calls"]}) == [t for t in range(T_DYN) if t not in (2, 4, 6)]
    regrown = sum(int(a["regrown"].sum()) for r in ranks for u in r["updates"] for a in u["after"].values())
    assert regrown > 0, "some entries must be regrown (their moments restart at zero)"


# ---- 4. the norm DeepSpeed clips with ----------------------------------------------------------
@pytest.mark.parametrize("method", ["rigl", "set"])
@pytest.mark.parametrize(("stage", "precision"), CASES, ids=CASE_IDS)
def test_grad_norm_is_the_norm_of_the_masked_gradient(stage, precision, method):
    ranks = scenario(suite(stage, precision), method)
    assert all(r["managed_all"] for r in ranks), "every parameter is managed: the views cover the whole gradient"
    norms = [r["norms"] for r in ranks]
    assert norms[0] == norms[1] and len(norms[0]) == T_DYN
    assert all([s["step"] for s in r["sumsq"]] == list(range(T_DYN)) for r in ranks), "one masking per step"
    masking_mattered = False
    for t in range(T_DYN):
        assert all(r["sumsq"][t]["leaked"] == 0 for r in ranks), f"step {t}: non-TRAIN gradient entries survive"
        masked = sum(r["sumsq"][t]["masked"] for r in ranks)
        raw = sum(r["sumsq"][t]["raw"] for r in ranks)
        expected = math.sqrt(masked)
        assert expected > 0
        assert abs(norms[0][t] - expected) <= 1e-5 * expected, f"step {t}: DeepSpeed {norms[0][t]} vs masked {expected}"
        masking_mattered |= raw > masked * (1 + 1e-3)
    assert masking_mattered, "the unmasked gradient must be larger, or the test cannot tell them apart"


# ---- 6. memory -------------------------------------------------------------------------------
@pytest.mark.parametrize(("stage", "precision"), CASES, ids=CASE_IDS)
def test_optimizer_state_bytes_scale_with_density(stage, precision):
    density = 0.1
    ranks = scenario(suite(stage, precision), "bytes")
    for rank, r in enumerate(ranks):
        assert r["step"] == 5 and r["churn"] > 0, "a RigL update re-compacted the state"
        assert abs(r["density"] - density) < 1e-3
        assert r["flat_numel"] > 20_000
        assert r["moments_match"], "each moment holds exactly one entry per TRAIN entry"
        dense = 8 * r["flat_numel"]
        assert r["state_bytes"] >= 8 * r["n_train"]
        assert r["state_bytes"] <= (density + 0.02) * dense, (
            f"rank {rank}: {r['state_bytes']} B of state vs {dense} B dense ({r['state_bytes'] / dense:.4f})"
        )


# ---- 7. set-ups the manager rejects ------------------------------------------------------------
ERRORS = {
    "bf16_optimizer": ("BF16_Optimizer", "ValueError", "BF16_Optimizer"),
    "round_robin_1": ("DeepSpeedZeroOptimizer", "ValueError", "round_robin_gradients"),
    "round_robin_2": ("DeepSpeedZeroOptimizer", "ValueError", "round_robin_gradients"),
    **{f"offload_{s}": (None, "ValueError", "offload_optimizer") for s in STAGES},
    **{f"non_compact_{s}": (None, "TypeError", "CompactAdamW") for s in STAGES},
    "second_manager": ("DeepSpeedZeroOptimizer", "RuntimeError", "already installed"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_unsupported_setups_fail_at_attach(case):
    zero, kind, text = ERRORS[case]
    ranks = scenario(setup(), case)
    for rank, r in enumerate(ranks):
        if zero is not None:
            assert r["zero"] == zero, f"the config must build DeepSpeed's {zero}, got {r['zero']}"
        assert r["error"] is not None, f"rank {rank}: attach_to_engine accepted {case}"
        assert r["error"][0] == kind and text in r["error"][1], f"rank {rank}: {r['error']}"
        assert not r["step_wrapped"], "a failed attach must leave the ZeRO step alone"
        assert r["global_steps"] == 0
    assert ranks[0]["error"] == ranks[1]["error"]


@pytest.mark.parametrize("case", ERRORS)
def test_failed_attach_leaves_the_weights_alone(case):
    """A rejected set-up must not have pruned anything: the user may fix the config and go on."""
    for rank, r in enumerate(scenario(setup(), case)):
        assert r["error"] is not None
        assert r["changed_weights"] == [], f"rank {rank}: the failed attach changed {r['changed_weights']}"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("stage", STAGES)
def test_whole_tensor_freezing_allocates_nothing(stage, precision):
    ranks = scenario(setup(), f"whole_freeze_{stage}_{precision}")
    frozen = ["l1.weight", "l1.bias"]
    numels = ranks[0]["dense"]["numels"]
    n_all, n_frozen = sum(numels.values()), sum(numels[n] for n in frozen)
    for rank, r in enumerate(ranks):
        dense, fr = r["dense"], r["frozen"]
        assert fr["frozen_names"] == frozen
        assert set(fr["managed"]) == set(dense["managed"]) - {"l1.weight"}, "frozen tensors are not managed"
        for n in frozen:
            assert dense["in_optimizer"][n] and not fr["in_optimizer"][n], f"{n} must not reach the ZeRO optimizer"
            assert not fr["hp_mapping"][n], f"{n} must have no fp32 master fragment"
            assert fr["unchanged"][n], f"rank {rank}: frozen {n} moved"
            assert not dense["unchanged"][n]
        assert not fr["unchanged"]["l2.weight"] and fr["step"] == dense["step"] == 3
    flat = {k: sum(r[k]["flat_numel"] for r in ranks) for k in ("dense", "frozen")}
    assert n_all <= flat["dense"] <= n_all + 10
    assert n_all - n_frozen <= flat["frozen"] <= n_all - n_frozen + 10, f"fp32 partitions hold {flat}"
    state = {k: sum(r[k]["state_bytes"] for r in ranks) for k in ("dense", "frozen")}
    frozen_train = ranks[0]["dense"]["train_counts"]["l1.weight"] + numels["l1.bias"]  # l1.bias is unmanaged
    assert state["dense"] - state["frozen"] >= 8 * frozen_train, f"optimizer state {state}"


# ---- the machine stays clean -------------------------------------------------------------------
def test_launches_leave_no_shared_memory_files():
    suite(1, "fp32")  # at least one launch in this session
    results = launch_results()
    assert results
    for key, res in results.items():
        for rank, shm in enumerate(res["_shm"]):
            assert shm["local_size"] is None, f"{key} rank {rank}: LOCAL_SIZE turns on DeepSpeed's shm all-reduce"
            assert not shm["existed"], f"{key} rank {rank}: DeepSpeed created {shm['path']}"
            assert not os.path.exists(shm["path"])
