"""World-size-independent dimred checkpoints: format, integrity, and reassembly at any layout.

Single-process tests cover the file format and the errors; multi-process ones save and load with
arbitrary per-rank ranges (plain torch) and through real DeepSpeed ZeRO-1/2/3 engines, comparing the
full masks with what was saved.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors import safe_open

import dimred_dist as dd
from dimred_dist.distributed.checkpoint import (
    CheckpointError,
    load_dimred_state,
    read_full_masks,
    read_manifest,
    same_partitioning,
    save_dimred_state,
)
from dimred_dist.optim import CompactAdamW
from tests.dist_harness import run_distributed
from tests.distributed import checkpoint_cases as cases


def _manager(model=None, method: str = "rigl", resuming: bool = False):
    return dd.DimRedManager(cases.recipe(method), model or cases.mlp(), total_steps=20).prepare(resuming=resuming)


def _masks(mgr) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (mgr.state[n].keep.clone(), mgr.state[n].train.clone()) for n in mgr.views}


def _full(ranks: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Full (keep, train) from the ranks' ``{name: (start, end, keep, train)}`` (the last rank ends at numel)."""
    numel = {n: max(r[n][1] for r in ranks) for n in ranks[0]}
    return {n: tuple(cases.assemble([(r[n][0], r[n][1], r[n][k]) for r in ranks], numel[n]) for k in (2, 3))
            for n in numel}


def _assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for n in expected:
        assert torch.equal(got[n][0], expected[n][0]) and torch.equal(got[n][1], expected[n][1]), n


@pytest.fixture
def saved(tmp_path):
    mgr = _manager()
    cases.scribble(mgr)
    save_dimred_state(mgr, tmp_path)
    return mgr, tmp_path


# ---- one process ------------------------------------------------------------------------------
def test_round_trip_restores_masks_step_and_optimizer_masks(saved):
    mgr, path = saved
    model = cases.mlp(seed=1)
    fresh = _manager(model, resuming=True)
    opt = CompactAdamW(model.parameters(), lr=1e-2)
    manifest = load_dimred_state(fresh, path)
    fresh.attach(opt)
    _assert_same(_masks(fresh), _masks(mgr))
    assert fresh.step == manifest.step == 7
    for name, v in fresh.views.items():
        assert bool((v.weight()[~fresh.state[name].keep] == 0).all()), "PRUNE entries are zeroed on load"
        assert torch.equal(opt.train_mask(v.param), fresh.state[name].train)
    _assert_same(read_full_masks(path), _masks(mgr))


def test_files_are_safetensors_and_json_with_checksums(saved, monkeypatch):
    mgr, path = saved
    raw = json.loads((path / "dimred" / "manifest.json").read_text())
    assert (raw["world_size"], raw["zero_stage"], raw["step"]) == (1, 0, 7)
    assert raw["recipe"]["method"] == "rigl" and raw["params"]["0.weight"] == [29, 13]
    [f] = raw["files"]
    blob = (path / "dimred" / f["file"]).read_bytes()
    assert f["bytes"] == len(blob) and f["ranges"]["0.weight"] == [0, 29 * 13]
    with safe_open(path / "dimred" / f["file"], framework="pt") as h:
        assert h.get_tensor("0.weight.keep").dtype == torch.uint8  # bit-packed
        assert h.get_tensor("0.weight.keep").numel() == (29 * 13 + 7) // 8
    # no pickle anywhere on load
    def refuse(*a, **k):
        raise AssertionError("pickle used on load")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load_dimred_state(_manager(resuming=True), path)


def test_never_overwrites(saved):
    mgr, path = saved
    before = {p.name: p.read_bytes() for p in (path / "dimred").iterdir()}
    mgr.step = 8
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_dimred_state(mgr, path)
    assert {p.name: p.read_bytes() for p in (path / "dimred").iterdir()} == before


def test_bad_checksum_raises_and_changes_nothing(saved):
    _, path = saved
    f = path / "dimred" / "rank0.safetensors"
    blob = bytearray(f.read_bytes())
    blob[-3] ^= 0x10
    f.write_bytes(bytes(blob))
    fresh = _manager(cases.mlp(seed=1), resuming=True)
    before = _masks(fresh)
    with pytest.raises(CheckpointError, match="checksum mismatch for .*rank0.safetensors"):
        load_dimred_state(fresh, path)
    _assert_same(_masks(fresh), before)
    assert fresh.step == 0


@pytest.mark.parametrize("other,first", [
    (lambda: torch.nn.Sequential(torch.nn.Linear(13, 29), torch.nn.ReLU(), torch.nn.Linear(29, 8)), "'2.weight'"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(13, 29)), "'2.weight'"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(12, 29), torch.nn.Linear(29, 7)), "'0.weight'"),
])
def test_other_model_names_the_first_differing_parameter(saved, other, first):
    _, path = saved
    torch.manual_seed(0)
    fresh = _manager(other(), resuming=True)
    before = _masks(fresh)
    with pytest.raises(CheckpointError, match=f"from another model: .*{first}"):
        load_dimred_state(fresh, path)
    _assert_same(_masks(fresh), before)


def test_other_method_and_not_a_checkpoint(saved, tmp_path_factory):
    _, path = saved
    with pytest.raises(CheckpointError, match="saved by method 'rigl'"):
        load_dimred_state(_manager(method="magnitude", resuming=True), path)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="not a dimred checkpoint"):
        read_manifest(empty)
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        read_manifest(empty / "missing")
    raw = json.loads((path / "dimred" / "manifest.json").read_text())
    raw["files"][0]["ranges"]["0.weight"] = [0, 100]
    (path / "dimred" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="ranges of '0.weight'"):
        read_manifest(path)


def test_same_partitioning():
    class M:
        world_size, zero_stage = 2, 2

    assert same_partitioning(M, 2, 1) and same_partitioning(M, 2, 2)
    assert not same_partitioning(M, 1, 2) and not same_partitioning(M, 2, 3) and not same_partitioning(M, 2, 0)
    M.zero_stage = 0
    assert same_partitioning(M, 4, 0) and not same_partitioning(M, 2, 3)


# ---- arbitrary layouts, plain torch processes --------------------------------------------------
SAVE_CUTS = [0, 0, 3, 4, 9]  # 4 ranks; rank 0 owns nothing; ranges are not multiples of 8


@pytest.fixture(scope="module")
def sliced(tmp_path_factory):
    path = tmp_path_factory.mktemp("sliced")
    return path, _full(run_distributed(cases.sliced_save, 4, SAVE_CUTS, str(path)))


@pytest.mark.distributed
@pytest.mark.parametrize("cuts", [[0, 1, 2], [0, 5, 6], [0, 1, 2, 3]], ids=["2 halves", "2 uneven", "3 thirds"])
def test_any_layout_reads_back_what_any_layout_saved(sliced, cuts):
    path, full = sliced
    _assert_same(read_full_masks(path), full)
    for rank in run_distributed(cases.sliced_load, len(cuts) - 1, cuts, str(path)):
        assert rank["step"] == 7
        for n, (s, e, keep, train) in rank["masks"].items():
            assert torch.equal(keep, full[n][0][s:e]) and torch.equal(train, full[n][1][s:e]), n


@pytest.mark.distributed
@pytest.mark.parametrize("cuts", [[0, 5, 6], [0, 1]], ids=["2 uneven", "1 process"])
def test_method_tensor_state_reshards(tmp_path, cuts):
    """Tensor state saved by 3 ranks (rank 2 owns half of every parameter, biases included) is read back at
    another layout: every rank gets exactly its own range, in place, with its dtype."""
    run_distributed(cases.tensor_save, 3, [0, 1, 2, 4], str(tmp_path))
    manifest = read_manifest(tmp_path)
    assert manifest.tensors["snap"]["dtype"] == "float32" and manifest.tensors["flag"]["dtype"] == "bool"
    assert set(manifest.tensors["snap"]["params"]) == {n for n, _ in cases.mlp().named_parameters()}
    ranks = run_distributed(cases.tensor_load, len(cuts) - 1, cuts, str(tmp_path))
    for r in ranks:
        assert set(r["loaded"]) == {"snap", "flag"}
        for key, per in r["loaded"].items():
            assert set(per) == set(r["ranges"])
            for n, t in per.items():
                expected = cases.tensor_values(n, *r["ranges"][n])[key]
                assert t.dtype == expected.dtype and torch.equal(t, expected), (key, n)


@pytest.mark.distributed
def test_one_process_reads_a_four_rank_save(sliced):
    path, full = sliced
    fresh = _manager(cases.mlp(seed=3), resuming=True)
    load_dimred_state(fresh, path)
    _assert_same(_masks(fresh), full)


@pytest.mark.distributed
def test_a_corrupt_file_seen_by_one_rank_fails_every_rank(tmp_path):
    run_distributed(cases.sliced_save, 3, [0, 1, 2, 4], str(tmp_path))  # rank 2 saves [1/2, 1)
    f = tmp_path / "dimred" / "rank2.safetensors"
    f.write_bytes(f.read_bytes()[:-1] + b"\0")
    r0, r1 = run_distributed(cases.sliced_load, 2, [0, 1, 2], str(tmp_path), timeout=60)
    assert "another rank failed" in r0["error"] and "checksum mismatch" in r1["error"]
    assert r0["unchanged"] and r1["unchanged"]


# ---- real ZeRO engines --------------------------------------------------------------------------
@pytest.mark.distributed
def test_zero_layouts_and_one_process_exchange_checkpoints(tmp_path):
    z2 = tmp_path / "zero2"
    saved_ranks = run_distributed(cases.zero_save, 2, 2, str(z2), 5, timeout=180)
    saved_full = _full([r["masks"] for r in saved_ranks])
    assert saved_ranks[0]["step"] == 5 and saved_ranks[0]["churn"] > 0
    # same world size and stage, other stages, and one process read the ZeRO-2 save
    one = dd.DimRedManager(cases.recipe(), cases.net(3), total_steps=20).prepare(resuming=True)
    load_dimred_state(one, z2)
    _assert_same(_masks(one), saved_full)
    # one process saves; ZeRO-3 on 2 ranks reads it
    single = tmp_path / "single"
    cases.scribble(one)
    save_dimred_state(one, single)
    plans = [(2, z2, saved_full, 5), (1, z2, saved_full, 5), (3, z2, saved_full, 5), (3, single, _masks(one), 7)]
    loaded = run_distributed(cases.zero_load, 2, [(stage, str(p)) for stage, p, _, _ in plans], timeout=180)
    for i, (stage, path, expected, step) in enumerate(plans):
        ranks = [r[i] for r in loaded]
        _assert_same(_full([r["masks"] for r in ranks]), expected)
        assert all(r["pruned_abs_sum"] == 0.0 and r["step"] == step for r in ranks), (stage, path)


# ---- optimizer moments on another world size / stage ---------------------------------------------
# The same batch on every rank, no clipping: the runs differ only in the order of fp32 sums (the ZeRO
# reduction, the partitioned update), so the next losses agree to a relative 1e-5; restarting the
# moments instead moves them by more than 1e-3 (checked, so the comparison can fail).
MOMENT_RTOL = 1e-5


def _plain_resume(directory, *, moments: bool = True) -> tuple[list[float], dd.DimRedManager]:
    model = cases.net(1)
    model.load_state_dict(torch.load(directory / "weights.pt", weights_only=True))
    mgr = dd.DimRedManager(cases.recipe(), model, total_steps=20).prepare(resuming=True)
    load_dimred_state(mgr, directory)
    if not moments:
        mgr._pending_moments = None
    opt = CompactAdamW(model.parameters(), lr=1e-2)
    mgr.attach(opt)
    return cases.plain_steps(model, opt, cases.MOMENT_STEPS, cases.MORE_STEPS), mgr


@pytest.mark.distributed
def test_moments_go_on_from_two_zero2_ranks_to_one_process(tmp_path):
    ref = run_distributed(cases.moments_zero_save, 2, 2, str(tmp_path), timeout=180)[0]["losses"]
    manifest = read_manifest(tmp_path)
    assert manifest.optimizer_step == 3 and "optimizer.exp_avg_sq" in manifest.tensors  # RigL skips 2 steps
    from dimred_dist.distributed.checkpoint import state_counts

    train = {n: c[0] for n, c in state_counts(manifest).items()}
    saved = dict.fromkeys(train, 0)
    for f in manifest.files:
        with safe_open(manifest.path(f), framework="pt") as h:
            for n in train:
                if f"method.optimizer.exp_avg.{n}" in h.keys():
                    saved[n] += h.get_slice(f"method.optimizer.exp_avg.{n}").get_shape()[0]
    assert saved == train  # managed parameters: the moments of TRAIN entries only
    got, mgr = _plain_resume(tmp_path)
    assert mgr.step == cases.MOMENT_STEPS + cases.MORE_STEPS
    assert got == pytest.approx(ref, rel=MOMENT_RTOL)
    restarted, _ = _plain_resume(tmp_path, moments=False)
    assert max(abs(a - b) / abs(b) for a, b in zip(restarted, ref)) > 1e-3


@pytest.mark.distributed
def test_moments_go_on_from_one_process_to_two_zero3_ranks(tmp_path):
    model = cases.net(0)
    mgr = dd.DimRedManager(cases.recipe(), model, total_steps=20).prepare()
    opt = CompactAdamW(model.parameters(), lr=1e-2)
    mgr.attach(opt)
    cases.plain_steps(model, opt, 0, cases.MOMENT_STEPS)
    save_dimred_state(mgr, tmp_path)
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, tmp_path / "weights.pt")
    ref = cases.plain_steps(model, opt, cases.MOMENT_STEPS, cases.MORE_STEPS)
    ranks = run_distributed(cases.moments_zero_load, 2, 3, str(tmp_path), timeout=180)
    for r in ranks:
        assert r["step"] == cases.MOMENT_STEPS + cases.MORE_STEPS
        assert r["losses"] == pytest.approx(ref, rel=MOMENT_RTOL)
