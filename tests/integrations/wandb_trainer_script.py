"""A Trainer run that reports to W&B (offline) with dimred metrics and plots; launched by test_wandb_trainer.py.

    WANDB_MODE=offline WANDB_DIR=DIR deepspeed --num_gpus 2 tests/integrations/wandb_trainer_script.py \
        --out DIR --zero-config configs/deepspeed/zero2.json

Writes DIR/result_rank<r>.json: the manager's final metrics and topology history, this rank's
compact optimizer state bytes (held and dense-equivalent), and whether a W&B run was active here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from transformers import Trainer

import dimred_dist
from dimred_dist.integrations.hf import DimRedCallback, compact_optimizer
from dimred_dist.metrics import optimizer_bytes
from tests.integrations.tiny_lm import tiny_lm_and_data, training_arguments


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--zero-config", default=None)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--local_rank", type=int, default=-1)
    a = p.parse_args()
    model, ds = tiny_lm_and_data()
    args = training_arguments(a.out, a.steps, a.zero_config, report_to=["wandb"], run_name="dimred-e2e")
    recipe = dimred_dist.load_recipe({"method": "rigl", "sparsity": 0.8, "args": {"update_interval": 2}})
    callback = DimRedCallback(recipe, plot_every=2)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback],
                      optimizer_cls_and_kwargs=compact_optimizer(args))
    trainer.train()

    mgr = callback.manager
    wandb = sys.modules.get("wandb")
    result = {
        "rank": dist.get_rank(), "world_size": dist.get_world_size(), "metrics": mgr.metrics(),
        "history": mgr.topology_history, "opt_bytes": list(optimizer_bytes(mgr.optimizer)),
        "inner_optimizer": type(mgr.optimizer).__name__, "zero_stage": mgr.adapter.topology.zero_stage,
        "wandb_run_active": wandb is not None and wandb.run is not None,
    }
    Path(a.out, f"result_rank{dist.get_rank()}.json").write_text(json.dumps(result, indent=1))
    if wandb is not None and wandb.run is not None:
        wandb.run.finish()  # flush the offline run before the process group goes
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
