"""A Trainer script with dimred_dist added in three lines; launched by the integration tests.

    deepspeed --num_gpus 2 tests/integrations/hf_trainer_script.py --out DIR --zero-config ds.json
    accelerate launch --config_file acc.yaml tests/integrations/hf_trainer_script.py --out DIR

Writes DIR/result_rank<r>.json: the optimizer class inside the engine, the manager's metrics, the
number of steps, and the largest |w| over pruned entries of the gathered full parameters.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch.distributed as dist
from transformers import Trainer

import dimred_dist
from dimred_dist.integrations.hf import DimRedCallback, compact_optimizer
from tests.integrations.tiny_lm import tiny_lm_and_data, training_arguments


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--zero-config", default=None, help="DeepSpeed JSON passed to TrainingArguments (deepspeed launcher)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--recipe", default=None, help="a recipe as JSON (default: RigL at 80%%)")
    p.add_argument("--local_rank", type=int, default=-1)
    a = p.parse_args()
    model, ds = tiny_lm_and_data()
    args = training_arguments(a.out, a.steps, a.zero_config, report_to=[], bf16=a.bf16)
    spec = json.loads(a.recipe) if a.recipe else {"method": "rigl", "sparsity": 0.8, "args": {"update_interval": 2}}
    recipe = dimred_dist.load_recipe(spec)  # line 1
    callback = DimRedCallback(recipe)  # line 2
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback],
                      optimizer_cls_and_kwargs=compact_optimizer(args))  # line 3
    callback_initial = {}
    orig_prepare = dimred_dist.DimRedManager.prepare

    def prepare(self, **kw):  # the topology the manager starts from (before training moves it)
        out = orig_prepare(self, **kw)
        callback_initial.update({n: [v.start, v.end, self.state[n].keep.tolist()] for n, v in self.views.items()})
        return out

    dimred_dist.DimRedManager.prepare = prepare
    trainer.train()

    mgr = callback.manager
    engine = trainer.model_wrapped
    zero = getattr(engine, "optimizer", None)
    inner = type(getattr(zero, "optimizer", zero)).__name__
    stage = mgr.adapter.topology.zero_stage
    max_pruned = 0.0
    for name, v in mgr.views.items():
        param = dict(engine.module.named_parameters())[name] if hasattr(engine, "module") else None
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], enabled=stage == 3):
            full = param.detach().float().reshape(-1)[v.start : v.end].clone()
        pruned = full[~mgr.state[name].keep]
        max_pruned = max(max_pruned, float(pruned.abs().max()) if pruned.numel() else 0.0)
    masks = {n: [v.start, v.end, mgr.state[n].keep.tolist()] for n, v in mgr.views.items()}
    result = {
        "masks": masks, "initial_masks": callback_initial, "history": mgr.topology_history,
        "learning_rates": [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h],
        "rank": dist.get_rank(), "world_size": dist.get_world_size(), "engine": type(engine).__name__,
        "zero_optimizer": type(zero).__name__, "inner_optimizer": inner, "zero_stage": stage,
        "manager_step": mgr.step, "global_step": trainer.state.global_step, "metrics": mgr.metrics(),
        "max_abs_pruned": max_pruned, "opt_state_bytes": mgr.optimizer.state_bytes(),
        "logged_density": [h.get("dimred/density") for h in trainer.state.log_history if "dimred/density" in h],
    }
    Path(a.out, f"result_rank{dist.get_rank()}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
