"""The tiny causal LM, its data and its training arguments, shared by the Trainer scripts."""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments


def tiny_lm_and_data() -> tuple[GPT2LMHeadModel, Dataset]:
    """A 2-layer GPT-2 (seed 0) and 64 random sequences of 16 tokens whose labels are the inputs."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=61))
    ids = torch.randint(0, 61, (64, 16), generator=torch.Generator().manual_seed(1))
    return model, Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def training_arguments(out: str, steps: int, zero_config: str | None, **extra: Any) -> TrainingArguments:
    """2 sequences per device, lr 1e-3, a log every 2 steps, no saving, CPU, clipping at 1."""
    return TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=2,
        save_strategy="no", use_cpu=True, deepspeed=zero_config, disable_tqdm=True, max_grad_norm=1.0, seed=0,
        **extra,
    )
