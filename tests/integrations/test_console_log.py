"""The console line of a Trainer run carries the loss and a few dimred figures, not one key per layer;
the log history (what W&B and TensorBoard receive) keeps every key."""

from __future__ import annotations

import ast

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import dimred_dist
from dimred_dist.integrations.hf import CONSOLE_KEYS, DimRedCallback, compact_optimizer


@pytest.mark.parametrize("disable_tqdm", [True, False], ids=["printer", "progress-bar"])
def test_console_keeps_the_loss_readable(tmp_path, capsys, disable_tqdm):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=61))
    ids = torch.randint(0, 61, (16, 16), generator=torch.Generator().manual_seed(1))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
                             logging_steps=2, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=disable_tqdm, seed=0)
    dimred = DimRedCallback(dimred_dist.load_recipe({"method": "rigl", "sparsity": 0.8,
                                                     "schedule": {"kind": "periodic", "interval": 2}}))
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids.tolist(),
                                                                                 "labels": ids.tolist()}),
                      callbacks=[dimred], optimizer_cls_and_kwargs=compact_optimizer(args))
    trainer.train()
    printed = [ast.literal_eval(line) for line in capsys.readouterr().out.splitlines()
               if line.startswith("{") and "'loss'" in line]
    assert len(printed) == 2, "the two logging steps print one line each"
    for line in printed:
        dimred_keys = {k for k in line if k.startswith("dimred/")}
        assert dimred_keys <= set(CONSOLE_KEYS)
        assert set(CONSOLE_KEYS) - {"dimred/churn"} <= dimred_keys
        assert "loss" in line
    assert "dimred/churn" in printed[-1], "the update before step 2 has a churn by the second log"
    history = [h for h in trainer.state.log_history if "loss" in h]
    n_layers = len(dimred.manager.views)
    for h in history:
        assert sum(k.startswith("dimred/density/") for k in h) == n_layers
        assert sum(k.startswith("dimred/train_fraction/") for k in h) == n_layers
