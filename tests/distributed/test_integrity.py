"""Crash-safe, verifiable checkpoints in one process: a save cut short is never taken for a whole one,
every file a resume loads is checked against the SHA-256 recorded at save time, and the metric
counters (topology updates, churn, ITOP history) continue after a resume."""

from __future__ import annotations

import json
import pickle
import re

import pytest
import torch

import dimred_dist as dd
from dimred_dist.distributed import checkpoint as ckpt
from dimred_dist.distributed.integrity import checkpoint_problem, incomplete_later, newest_complete, set_aside
from dimred_dist.optim import CompactAdamW
from tests.distributed import checkpoint_cases as cases

COUNTERS = ("dimred/topology_updates", "dimred/churn", "dimred/last_update_step", "dimred/itop_rate",
            "dimred/drop_fraction", "dimred/topology_update_seconds")


def _trained(steps: int = 7):
    """RigL (update every 2 steps) on the MLP, trained ``steps`` steps with CompactAdamW."""
    model = cases.mlp()
    mgr = dd.DimRedManager(cases.recipe(), model, total_steps=20).prepare()
    opt = CompactAdamW(model.parameters(), lr=1e-2)
    mgr.attach(opt)
    x = torch.randn(16, 13, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return mgr


def _fake_trainer_files(folder) -> None:
    (folder / "global_step7").mkdir(parents=True)
    (folder / "global_step7" / "mp_rank_00_model_states.pt").write_bytes(b"weights" * 10)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 7}))


def test_counters_and_itop_history_continue_after_a_resume(tmp_path):
    mgr = _trained()
    before = mgr.metrics()
    assert before["dimred/topology_updates"] == 3 and before["dimred/itop_rate"] > 0.3 + 1e-3
    ckpt.save_dimred_state(mgr, tmp_path)
    fresh = dd.DimRedManager(cases.recipe(), cases.mlp(seed=1), total_steps=20).prepare(resuming=True)
    ckpt.load_dimred_state(fresh, tmp_path)
    after = fresh.metrics()
    assert {k: after[k] for k in COUNTERS} == {k: before[k] for k in COUNTERS}
    assert fresh.topology_history == mgr.topology_history
    assert all(torch.equal(fresh.ever.bits[n], mgr.ever.bits[n]) for n in mgr.views)


def test_a_save_cut_short_leaves_no_dimred_folder_and_the_next_save_completes(tmp_path, monkeypatch):
    mgr = _trained(1)
    _fake_trainer_files(tmp_path)

    def killed(*a, **k):
        raise KeyboardInterrupt("killed while hashing")

    monkeypatch.setattr(ckpt, "hash_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_dimred_state(mgr, tmp_path, record_checkpoint=True)
    assert (tmp_path / "dimred.tmp" / "rank0.safetensors").is_file() and not (tmp_path / "dimred").exists()
    assert "not a dimred checkpoint" in checkpoint_problem(tmp_path)
    monkeypatch.undo()
    ckpt.save_dimred_state(mgr, tmp_path, record_checkpoint=True)  # the stale dimred.tmp is replaced
    assert not (tmp_path / "dimred.tmp").exists() and checkpoint_problem(tmp_path) is None
    recorded = ckpt.read_manifest(tmp_path).checkpoint_files
    assert sorted(recorded) == ["global_step7/mp_rank_00_model_states.pt", "trainer_state.json"]


@pytest.mark.parametrize("tamper,why", [
    (lambda d: (d / "global_step7" / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(print)),
     "checksum mismatch for .*mp_rank_00_model_states.pt"),
    (lambda d: (d / "global_step7" / "evil.pt").write_bytes(pickle.dumps(print)),
     "evil.pt is not among the files the checkpoint recorded"),
    (lambda d: (d / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    (lambda d: (d / "dimred" / "manifest.json").unlink(), "not a dimred checkpoint"),
    (lambda d: (d / "dimred" / "rank0.safetensors").write_bytes(b"x"), "checksum mismatch for .*rank0"),
], ids=["replaced pickle", "planted pickle", "removed file", "no manifest", "truncated mask file"])
def test_every_recorded_file_is_verified(tmp_path, tamper, why):
    mgr = _trained(1)
    _fake_trainer_files(tmp_path)
    ckpt.save_dimred_state(mgr, tmp_path, record_checkpoint=True)
    assert checkpoint_problem(tmp_path) is None
    tamper(tmp_path)
    assert re.search(why, checkpoint_problem(tmp_path))


def test_newest_complete_skips_cut_short_saves_and_they_are_set_aside(tmp_path):
    mgr = _trained(1)
    for step in (2, 4, 6):
        folder = tmp_path / f"checkpoint-{step}"
        _fake_trainer_files(folder)
        mgr.step = step
        ckpt.save_dimred_state(mgr, folder, record_checkpoint=True)
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text("{}")  # changed after its save
    _fake_trainer_files(tmp_path / "checkpoint-8")  # killed before dimred/ was written
    best, skipped = newest_complete(tmp_path)
    assert best == tmp_path / "checkpoint-4"
    assert [p.name for p, _ in skipped] == ["checkpoint-8", "checkpoint-6"]
    assert "not a dimred checkpoint" in skipped[0][1] and "checksum mismatch" in skipped[1][1]
    assert incomplete_later(tmp_path, 4) == [tmp_path / "checkpoint-8"]  # checkpoint-6 has a manifest
    moved = set_aside(tmp_path / "checkpoint-8")
    assert moved.name == "incomplete-checkpoint-8" and (moved / "trainer_state.json").is_file()
    assert newest_complete(tmp_path / "missing") == (None, [])
