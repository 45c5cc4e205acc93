"""Divergence is not success: non-finite gradients skip the topology update of their step (masks unchanged,
counted), and a run whose gradients stay non-finite stops with exit code 3 and a summary that says so."""

from __future__ import annotations

import json

import torch

import dimred_dist as dd
from dimred_dist.cli.train import main
from tests.cli.jobs import lm_job, write_job
from tests.distributed import checkpoint_cases as cases


def test_a_non_finite_gradient_skips_the_update_and_leaves_the_masks():
    model = cases.mlp()
    mgr = dd.DimRedManager(cases.recipe(), model, total_steps=20).prepare()  # RigL, update every 2 steps
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mgr.attach(opt)
    x = torch.randn(8, 13, generator=torch.Generator().manual_seed(0))
    for step in range(4):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if step == 2:  # an update step: one NaN in one managed gradient
            model[0].weight.grad[3, 4] = float("nan")
            before = {n: (mgr.state[n].keep.clone(), mgr.state[n].train.clone()) for n in mgr.views}
        opt.step()
        if step == 2:
            assert all(torch.equal(mgr.state[n].keep, before[n][0]) and torch.equal(mgr.state[n].train, before[n][1])
                       for n in mgr.views)
    m = mgr.metrics()
    assert (m["dimred/skipped_updates"], m["dimred/nonfinite_steps"], m["dimred/topology_updates"]) == (1, 1, 0)
    assert mgr.nonfinite_streak == 0  # step 3 was finite again
    assert [h["step"] for h in mgr.topology_history] == []  # step 2 skipped; the next update is at step 4


def test_a_diverging_run_exits_3_and_its_summary_says_so(tmp_path, capsys):
    job = lm_job(tmp_path, {"method": "magnitude", "sparsity": 0.5}, None, learning_rate=1e15, max_steps=12,
                 logging_steps=1, max_grad_norm=0.0)
    job["max_nonfinite_steps"] = 3
    rc = main(["--config", str(write_job(tmp_path, job))])
    err = capsys.readouterr().err
    assert rc == 3, err[-2000:]
    assert "non-finite (inf or NaN) for 3 optimizer steps in a row" in err
    summary = json.loads((tmp_path / "out" / "dimred_summary.json").read_text())
    assert summary["status"] == "diverged" and summary["global_step"] < 12 and "diverged" in summary["error"]
