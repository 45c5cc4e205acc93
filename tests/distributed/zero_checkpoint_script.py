"""Resume through DeepSpeed's own checkpoint: run by tests/distributed/test_zero_checkpoint.py under torchrun.

Trains 5 steps with RigL under ZeRO-<stage>, saves the engine checkpoint (which holds the compact
optimizer's state) and the manager's state, trains 4 more steps (two topology updates), then builds
a fresh engine, loads both and replays the same 4 steps. Writes result_rank<r>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn

import dimred_dist as dd
from dimred_dist.integrations.deepspeed import attach_to_engine
from dimred_dist.optim import CompactAdamW


def build(stage: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 33), nn.ReLU(), nn.Linear(33, 5))
    cfg = {
        "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 5e5, "allgather_bucket_size": 5e5,
                              "stage3_param_persistence_threshold": 10},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=CompactAdamW(model.parameters(), lr=1e-2), config=cfg)
    recipe = dd.load_recipe({"method": "rigl", "sparsity": 0.8, "args": {"update_interval": 2}})
    return engine, attach_to_engine(recipe, engine, total_steps=20)


def run(engine, steps) -> list[float]:
    losses = []
    for i in steps:
        x = torch.randn(2, 7, generator=torch.Generator().manual_seed(100 * i + dist.get_rank()))
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def opt_state(engine) -> dict[str, torch.Tensor]:
    inner = engine.optimizer.optimizer
    return {f"{i}.{k}": v.clone() for i, st in enumerate(inner.state.values()) for k, v in st.items()}


def main() -> None:
    stage, out = int(sys.argv[1]), Path(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    engine, mgr = build(stage)
    run(engine, range(5))
    engine.save_checkpoint(str(out), tag="t")
    saved_opt = opt_state(engine)
    torch.save(mgr.state_dict(), out / f"dimred_rank{rank}.pt")
    losses = run(engine, range(5, 9))
    weights = {n: v.weight().clone() for n, v in mgr.views.items()}
    masks = {ps.name: ps.keep.clone() for ps in mgr.state}

    engine2, mgr2 = build(stage)
    engine2.load_checkpoint(str(out), tag="t")
    mgr2.load_state_dict(torch.load(out / f"dimred_rank{rank}.pt", weights_only=True))
    loaded_opt = opt_state(engine2)
    losses2 = run(engine2, range(5, 9))
    result = {
        "rank": rank,
        "opt_state_equal": saved_opt.keys() == loaded_opt.keys()
        and all(saved_opt[k].dtype == loaded_opt[k].dtype and torch.equal(saved_opt[k], loaded_opt[k]) for k in saved_opt),
        "mask_bits_dtypes": sorted({str(v.dtype) for k, v in loaded_opt.items() if k.endswith("mask_bits")}),
        "weights_equal": all(torch.equal(mgr2.views[n].weight(), w) for n, w in weights.items()),
        "masks_equal": all(torch.equal(mgr2.state[n].keep, m) for n, m in masks.items()),
        "losses": losses, "losses_resumed": losses2, "steps": [mgr.step, mgr2.step],
        "churn": mgr2.metrics().get("dimred/churn", 0.0),
    }
    (out / f"result_rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
