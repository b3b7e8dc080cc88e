"""Explicit SmoothQuant input scaling: the float function is unchanged, hooks run in the right order, detach
undoes it, bad scales are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.formats.activation import parse_activation_spec
from lowbit.model.act_quant import attach_input_quantizer
from lowbit.transforms.input_smoothing import (attach_input_smoothing, detach_input_smoothing, input_smoothings,
                                               linear_smoothing_scales)


def _linear_and_inputs(seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    linear = nn.Linear(16, 8)
    x = torch.randn(5, 7, 16)
    x[..., 3] *= 40.0  # an outlier channel, as LayerNorm outputs of transformers have
    return linear, x


def test_smoothing_keeps_the_float_function_and_moves_the_range_into_the_weights():
    linear, x = _linear_and_inputs()
    want = linear(x)
    scales = linear_smoothing_scales(linear, x.abs().reshape(-1, 16).amax(0))
    weight = linear.weight.detach().clone()
    attach_input_smoothing(linear, scales)
    torch.testing.assert_close(linear(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear.weight.detach(), weight * scales)
    seen = []
    linear.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    linear(x)
    smoothed_range = seen[0].abs().reshape(-1, 16).amax(0)
    assert smoothed_range.max() / smoothed_range.min() < (x.abs().reshape(-1, 16).amax(0).max()
                                                          / x.abs().reshape(-1, 16).amax(0).min())
    assert list(input_smoothings(nn.Sequential(linear))) == ["0"]
    detach_input_smoothing(linear)
    torch.testing.assert_close(linear.weight.detach(), weight, rtol=1e-6, atol=0)
    assert input_smoothings(nn.Sequential(linear)) == {}


def test_the_quantizer_sees_the_smoothed_input_and_is_more_accurate_per_tensor():
    linear, x = _linear_and_inputs()
    want = linear(x)
    spec = parse_activation_spec("int8:tensor:dynamic:asym")
    attach_input_quantizer(linear, spec)
    plain = (linear(x) - want).pow(2).mean()
    from lowbit.model.act_quant import detach_input_quantizer

    detach_input_quantizer(linear)
    attach_input_smoothing(linear, linear_smoothing_scales(linear, x.abs().reshape(-1, 16).amax(0)))
    attach_input_quantizer(linear, spec)
    smoothed = (linear(x) - want).pow(2).mean()
    assert smoothed < 0.5 * plain


def test_bad_scales_and_wrong_order_are_refused():
    linear, _ = _linear_and_inputs()
    with pytest.raises(ValueError, match="positive finite"):
        attach_input_smoothing(linear, torch.ones(15))
    with pytest.raises(ValueError, match="positive finite"):
        attach_input_smoothing(linear, torch.tensor([1.0] * 15 + [float("nan")]))
    with pytest.raises(ValueError, match="positive finite"):
        attach_input_smoothing(linear, torch.tensor([1.0] * 15 + [0.0]))
    attach_input_smoothing(linear, torch.ones(16))
    with pytest.raises(ValueError, match="already"):
        attach_input_smoothing(linear, torch.ones(16))
    other, _ = _linear_and_inputs(1)
    attach_input_quantizer(other, parse_activation_spec("int8:tensor:dynamic:asym"))
    with pytest.raises(ValueError, match="before the input quantizer"):
        attach_input_smoothing(other, torch.ones(16))
