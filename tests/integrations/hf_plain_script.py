"""Trainer without DeepSpeed (one process, or DDP under torchrun with gloo) plus a probe callback.

Run in-process by tests (``run(out)``) or as ``torchrun --nproc_per_node 2 hf_plain_script.py OUT``.
The probe checks, right before every optimizer step (after the Trainer computed the norm and
clipped), that gradients of non-TRAIN entries are exactly zero and records the norm of the clipped
gradients next to the norm the Trainer logged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import dimred_dist
from dimred_dist.integrations.hf import DimRedCallback, compact_optimizer

MAX_NORM = 0.5


class Probe(TrainerCallback):
    def __init__(self, dimred: DimRedCallback) -> None:
        self.dimred, self.records = dimred, []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        mgr = self.dimred.manager
        leaked = 0
        for name, v in mgr.views.items():
            g = v.grad()
            leaked += int((g[~mgr.state[name].train] != 0).sum())
        sq = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
        self.records.append({"leaked": leaked, "clipped_norm": sq**0.5})


class NoNormTrainer(Trainer):
    """Computes no gradient norm when it does not clip, as transformers 4 did."""

    def _get_grad_norm(self, model, grad_norm=None):
        return grad_norm


def run(out: str, ddp: bool = False, max_norm: float = MAX_NORM, trainer_cls: type[Trainer] = Trainer) -> dict:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=61))
    ids = torch.randint(0, 61, (64, 16), generator=torch.Generator().manual_seed(1))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=out, max_steps=6, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, max_grad_norm=max_norm, seed=0,
        ddp_backend="gloo" if ddp else None,
    )
    dimred = DimRedCallback(dimred_dist.load_recipe({"method": "rigl", "sparsity": 0.8, "args": {"update_interval": 2}}))
    probe = Probe(dimred)
    trainer = trainer_cls(model=model, args=args, train_dataset=ds, callbacks=[dimred, probe],
                      optimizer_cls_and_kwargs=compact_optimizer(args))
    trainer.train()
    mgr = dimred.manager
    pruned_max = max(float(v.weight()[~mgr.state[n].keep].abs().max()) for n, v in mgr.views.items())
    return {
        "records": probe.records,
        "grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
        "manager_step": mgr.step, "pruned_max": pruned_max, "churn": mgr.metrics().get("dimred/churn", 0.0),
        "optimizer": type(mgr.optimizer).__name__, "max_norm": max_norm,
    }


if __name__ == "__main__":
    result = run(sys.argv[1], ddp=True)
    Path(sys.argv[1], f"result_rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
