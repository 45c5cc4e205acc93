"""The freezing presets in configs/: which tensors of a BERT and a GPT-2 (built from configs) train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

import dimred_dist as dd
from dimred_dist.core.targets import freeze_whole_tensors

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=3))


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=8, vocab_size=50))


def _trainable(recipe_file: str, model) -> set[str]:
    freeze_whole_tensors(model, dd.load_recipe(str(CONFIGS / recipe_file)).freeze)
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_norms_and_biases_preset():
    bert = _trainable("train_norms_biases.yaml", _bert())
    assert bert, "something trains"
    assert all(n.endswith(".bias") or "LayerNorm" in n or n.startswith("classifier.") for n in bert)
    assert "bert.encoder.layer.1.attention.output.LayerNorm.weight" in bert
    assert "bert.encoder.layer.0.intermediate.dense.bias" in bert and "classifier.weight" in bert
    assert "bert.encoder.layer.0.intermediate.dense.weight" not in bert
    assert "bert.embeddings.word_embeddings.weight" not in bert
    gpt = _trainable("train_norms_biases.yaml", _gpt2())
    assert gpt == {n for n, _ in _gpt2().named_parameters() if n.endswith(".bias") or ".ln_" in n or "ln_f" in n}


def test_embeddings_preset():
    bert = _trainable("train_embeddings.yaml", _bert())
    assert bert == {n for n, _ in _bert().named_parameters() if n.startswith(("bert.embeddings.", "classifier."))}
    gpt = _trainable("train_embeddings.yaml", _gpt2())
    assert gpt == {"transformer.wte.weight", "transformer.wpe.weight"}  # lm_head is tied to wte


def test_head_plus_one_percent_preset():
    model = _bert()
    mgr = dd.DimRedManager(dd.load_recipe(str(CONFIGS / "train_head_plus_1pct.yaml")), model).prepare()
    assert not any(n.startswith("classifier.") for n in mgr.views), "the head is not managed: it trains whole"
    assert "bert.encoder.layer.0.attention.self.query.bias" in mgr.views
    m = mgr.metrics()
    assert m["dimred/fraction/train"] == pytest.approx(0.01, abs=0.005)
    assert m["dimred/fraction/prune"] == 0.0
