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
    asym = parse_activation_spec("int8:tensor:dynamic:asym")
    assert not asym.symmetric and str(asym) == "int8:tensor:dynamic:asym"
    assert parse_activation_spec(str(asym)) == asym and parse_activation_spec("int8:token:dynamic:sym").symmetric


@pytest.mark.parametrize("text, match", [("int8:token:static", "only be dynamic"), ("int8:row", "unknown option"),
                                         ("int8:tensor:static:magic", "unknown option"), ("int9", "unknown number format"),
                                         ("int8:tensor:static:asym", "asymmetric activations need"),
                                         ("fp8_e4m3:tensor:dynamic:asym", "asymmetric activations need")])
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


def test_asymmetric_tensor_dynamic_is_onnx_dynamic_quantize_linear():
    """int8:tensor:dynamic:asym is DynamicQuantizeLinear (followed by DequantizeLinear) as onnxruntime runs it."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "dql",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    spec = parse_activation_spec("int8:tensor:dynamic:asym")
    torch.manual_seed(0)
    cases = [torch.randn(7, 96) * 3 + 1.0,                    # both signs, off centre
             torch.nn.functional.gelu(torch.randn(5, 64) * 4),  # almost all positive (a GELU's output)
             -torch.rand(3, 40),                               # all negative: zero point at the top code
             torch.zeros(2, 8)]                                # empty range: scale 1
    for x in cases:
        theirs = session.run(None, {"x": x.numpy()})[0]
        ours = fake_quantize_activation(x, spec).numpy()
        step = max(float(x.max().clamp(min=0) - x.min().clamp(max=0)) / 255, 1e-12)
        assert np.abs(ours - theirs).max() <= 1e-5 * step  # the same codes, zero point and scale
    # the positive side of a GELU output gets almost all 256 codes; symmetric would give it 128
    x = cases[1]
    sym = fake_quantize_activation(x, parse_activation_spec("int8:tensor:dynamic"))
    assert float((fake_quantize_activation(x, spec) - x).abs().mean()) < 0.6 * float((sym - x).abs().mean())
