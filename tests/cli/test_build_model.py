"""The CLI's model builder: a classifier's loss must not be scaled by the world size."""

from __future__ import annotations

import pytest
import torch

from dimred_dist.cli.job import ModelConfig
from dimred_dist.cli.train import build_model
from tests.cli.jobs import write_pretrained_bert

pytest.importorskip("transformers")


def _trainer(model, tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    return Trainer(model=model, args=args)


def test_a_classifier_is_declared_blind_to_num_items_in_batch(tmp_path):
    """BERT's classification loss is a batch mean that ignores ``num_items_in_batch``, yet its forward
    takes ``**kwargs``; the Trainer would then multiply the loss (and gradients) by the world size."""
    folder = write_pretrained_bert(tmp_path / "bert")
    model = build_model(ModelConfig(pretrained=str(folder), task="sequence-classification"), ["a", "b"], 0)
    x, y = torch.randint(0, 10, (4, 6)), torch.tensor([0, 1, 1, 0])
    model.eval()
    plain = model(input_ids=x, labels=y).loss
    assert torch.equal(model(input_ids=x, labels=y, num_items_in_batch=torch.tensor(1000)).loss, plain)
    assert _trainer(model, tmp_path).model_accepts_loss_kwargs is False


def test_a_causal_lm_keeps_its_token_normalized_loss(tmp_path):
    model = build_model(ModelConfig(config={"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2,
                                            "vocab_size": 64, "n_positions": 32}), None, None)
    assert _trainer(model, tmp_path).model_accepts_loss_kwargs is True
