"""Selection of managed parameters by module type and name pattern."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dimred_dist.core.targets import TargetConfig, select_parameters


class Conv1D(nn.Module):
    """Stand-in for Hugging Face's GPT-2 Conv1D (matched by class name, transformers not imported)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.block = nn.ModuleDict({"attn": Conv1D(12, 4), "bn": nn.BatchNorm1d(4)})
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied to the embedding
        self.scale = nn.Parameter(torch.ones(1))  # a bare parameter of no managed module


def _names(**kw) -> list[str]:
    return list(select_parameters(Net(), TargetConfig(**kw)))


def test_default_selects_weights_of_linear_conv_embedding_in_model_order():
    assert _names() == ["emb.weight", "conv.weight", "block.attn.weight", "fc.weight"]


def test_values_are_the_model_parameters_themselves():
    net = Net()
    sel = select_parameters(net, TargetConfig())
    assert sel["fc.weight"] is net.fc.weight
    assert sel["emb.weight"] is net.head.weight  # the tied weight, once, under its canonical name


def test_tied_weight_appears_once_even_if_only_the_tied_module_matches():
    # head is a Linear, emb is excluded by type: the shared tensor is still managed once, as emb.weight
    assert _names(module_types=["Linear"]) == ["emb.weight", "fc.weight"]


def test_biases_on_request_only():
    assert _names(biases=True) == [
        "emb.weight", "conv.weight", "conv.bias", "block.attn.weight", "block.attn.bias", "fc.weight", "fc.bias",
    ]


def test_norms_on_request_only():
    got = _names(norms=True)
    assert [n for n in got if "norm" in n or ".bn." in n] == [
        "norm.weight", "norm.bias", "block.bn.weight", "block.bn.bias",
    ]
    assert "scale" not in got


def test_include_and_exclude_patterns():
    assert _names(include=["^fc\\.", "conv"]) == ["conv.weight", "fc.weight"]
    assert _names(exclude=["emb", "attn"]) == ["conv.weight", "fc.weight"]
    assert _names(include=["weight"], exclude=["^conv"]) == ["emb.weight", "block.attn.weight", "fc.weight"]
    # exclusion wins over inclusion
    assert _names(include=["fc", "conv"], exclude=["fc"], biases=True) == ["conv.weight", "conv.bias"]


def test_subclasses_match_by_mro():
    mha = nn.MultiheadAttention(8, 2)  # out_proj is NonDynamicallyQuantizableLinear(Linear)
    assert list(select_parameters(mha, TargetConfig())) == ["out_proj.weight"]


def test_nothing_matches_raises_with_what_the_model_has():
    with pytest.raises(ValueError, match=r"no parameter matches the targets.*include=\['nothing'\].*Embedding"):
        select_parameters(Net(), TargetConfig(include=["nothing"]))
    with pytest.raises(ValueError, match="no parameter matches"):
        select_parameters(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)), TargetConfig())


def test_invalid_config_raises_at_construction():
    with pytest.raises(ValueError, match=r"targets.include: invalid regular expression '\(unclosed'"):
        TargetConfig(include=["(unclosed"])
    with pytest.raises(ValueError, match="targets.exclude: invalid regular expression"):
        TargetConfig(exclude=["[a-"])
    with pytest.raises(ValueError, match="module_types is empty"):
        TargetConfig(module_types=[])
    with pytest.raises(TypeError):
        TargetConfig(["Linear"])  # keyword-only
