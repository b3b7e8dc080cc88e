"""Activation specs and the activation fake-quant kernel against hand computations."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.activation import ActivationSpec, fake_quantize_activation, parse_activation_spec


def test_parse_and_print():
    assert str(parse_activation_spec("int8:token:dynamic")) == "int8:token:dynamic"
    assert parse_activation_spec("int8:tensor:static:kl") == ActivationSpec("int8", "tensor", False, "kl")
    assert str(parse_activation_spec("int8:tensor:static")) == "int8:tensor:static:minmax"


@pytest.mark.parametrize("text, match", [("int8:token:static", "only be dynamic"), ("int8:row", "unknown option"),
                                         ("int8:tensor:static:magic", "unknown option"), ("int9", "unknown number format")])
def test_bad_specs(text, match):
    with pytest.raises(LowbitError, match=match):
        parse_activation_spec(text)


def test_per_token_dynamic_matches_hand_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0])[None, :, None]
    out = fake_quantize_activation(x, parse_activation_spec("int8:token:dynamic"))
    s = x.abs().amax(-1, keepdim=True) / 127.5
    assert torch.equal(out, torch.clamp(torch.round(x / s), -128, 127) * s)
    # every token keeps its own resolution
    assert float(((out - x).abs() / s).max()) <= 0.5 + 1e-4


def test_static_tensor_scale_saturates():
    x = torch.tensor([[0.5, -1.0, 100.0]])
    s = torch.tensor(1.0 / 127.5)
    out = fake_quantize_activation(x, parse_activation_spec("int8:tensor:static"), s)
    assert torch.equal(out, torch.clamp(torch.round(x / s), -128, 127) * s)
    assert float(out[0, 2]) == float(127 * s)  # 100 saturates at the largest code
