"""The HF Trainer path without DeepSpeed: one process in-process, and DDP over 2 real processes.

Without DeepSpeed the Trainer computes the gradient norm and clips before ``optimizer.step()``; the
callback masks non-TRAIN gradients before that, so the norm and the clipping see TRAIN entries only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import Trainer

from tests.integrations.hf_plain_script import NoNormTrainer, run

REPO = Path(__file__).resolve().parents[2]


def _check(result: dict) -> None:
    assert result["optimizer"] == "CompactAdamW"
    assert result["manager_step"] == 6
    assert result["pruned_max"] == 0.0
    assert result["churn"] > 0
    assert len(result["records"]) == len(result["grad_norms"]) == 6
    for rec, norm in zip(result["records"], result["grad_norms"]):
        assert rec["leaked"] == 0  # masked before the norm, not after it
        # The clipped gradient's norm follows from the logged norm: that norm was of the masked gradient.
        expected = min(norm, result["max_norm"])
        assert rec["clipped_norm"] == pytest.approx(expected, rel=1e-4)


def test_single_process_trainer_masks_before_clipping(tmp_path):
    _check(run(str(tmp_path)))


@pytest.mark.parametrize("trainer_cls", [Trainer, NoNormTrainer], ids=["norm-unclipped", "no-norm"])
def test_single_process_trainer_without_clipping_still_updates_the_topology(tmp_path, trainer_cls):
    """max_grad_norm=0: transformers 5 computes an unclipped norm, transformers 4 none; without a norm
    call the manager runs in the optimizer's pre-step hook."""
    r = run(str(tmp_path), max_norm=0.0, trainer_cls=trainer_cls)
    assert r["optimizer"] == "CompactAdamW"
    assert r["manager_step"] == 6
    assert r["churn"] > 0, "no topology update ran"
    assert r["pruned_max"] == 0.0


@pytest.mark.distributed
def test_ddp_trainer_masks_before_clipping(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29621",
           str(REPO / "tests" / "integrations" / "hf_plain_script.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=240)
    paths = [tmp_path / f"result_rank{r}.json" for r in (0, 1)]
    assert all(p.is_file() for p in paths), proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads(p.read_text()) for p in paths)
    _check(r0)
    _check(r1)
    assert r0["grad_norms"] == r1["grad_norms"]
