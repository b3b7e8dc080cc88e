"""QATLinear: step 0 is the PTQ result bit for bit, what it writes is what it computes, gradients reach
weights, steps and zero points, and grids it cannot train are refused with the reason."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.quantize import dequantize, quantize
from lowbit.formats.spec import parse_spec
from lowbit.training.fake_quant import QATLinear, check_trainable

SPECS = ["int2:g64:asym", "int3:g128", "int3:g128:asym", "int4:g32", "int8:channel", "ternary:g64", "binary:channel",
         "ternary:g256"]


def _weight(rows: int = 48, cols: int = 200) -> torch.Tensor:  # 200: ragged last group for g64/g128/g256
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.05


@pytest.mark.parametrize("spec", SPECS)
def test_starts_at_the_ptq_result_and_writes_what_it_computes(spec):
    qt = quantize(_weight(), parse_spec(spec))
    layer = QATLinear.from_qtensor(qt, dequantize(qt))
    assert torch.equal(layer.quantized_weight().detach(), dequantize(qt))
    with torch.no_grad():  # move away from the start: the written codes must still be the computed weight
        layer.weight.add_(torch.randn_like(layer.weight) * 0.02)
        layer.step.mul_(1.1)
        if layer.zero is not None:
            layer.zero.add_(0.6)
    written = layer.to_qtensor()
    assert written.spec == qt.spec and written.scales.dtype == qt.scales.dtype
    assert torch.equal(dequantize(written), layer.quantized_weight().detach())
    assert torch.equal(layer.to_linear().weight.detach(), dequantize(written))


@pytest.mark.parametrize("spec", SPECS)
def test_rtn_codes_from_the_original_weight(spec):
    w = _weight()
    qt = quantize(w, parse_spec(spec))
    layer = QATLinear.from_qtensor(qt, w)
    assert torch.equal(layer.to_qtensor().codes, qt.codes)


@pytest.mark.parametrize("spec", ["int2:g64:asym", "int4:g32", "ternary:g64", "binary:channel"])
def test_gradients_reach_weights_steps_and_zeros(spec):
    qt = quantize(_weight(), parse_spec(spec))
    layer = QATLinear.from_qtensor(qt, dequantize(qt), bias=torch.zeros(48))
    x = torch.randn(5, 200, generator=torch.Generator().manual_seed(1))
    (layer(x) ** 2).sum().backward()
    assert layer.weight.grad.abs().sum() > 0 and layer.step.grad.abs().sum() > 0
    assert layer.bias.grad.abs().sum() > 0
    if layer.zero is not None:
        assert layer.zero.grad is not None


def test_lsq_step_gradient_is_the_rounding_residual_inside_the_grid():
    # one group, one value inside the grid: d(q*s)/ds = round(w/s) - w/s, times LSQ's gradient scale
    qt = quantize(torch.tensor([[0.3, -1.0, 1.0, 0.0]]), parse_spec("int4:channel"))
    layer = QATLinear.from_qtensor(qt, torch.tensor([[0.3, -1.0, 1.0, 0.0]]))
    layer.quantized_weight()[0, 0].backward()
    s = float(layer.step.detach().half().float())
    expected = (round(0.3 / s) - 0.3 / s) * layer.grad_scale
    assert layer.step.grad[0, 0].item() == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("spec,reason", [("nf4:g64", "nf4"), ("fp8_e4m3:channel", "fp8_e4m3"),
                                         ("nvfp4", "nvfp4"), ("int4:g32:scale=e8m0", "scales"), ("int4:tensor", "tensor")])
def test_untrainable_specs_are_refused_with_the_reason(spec, reason):
    with pytest.raises(LowbitError, match=reason):
        check_trainable(parse_spec(spec), "layer")
