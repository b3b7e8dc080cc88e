"""A traced CNN as an ONNX graph: float (FP32 or FP16) or QDQ (int8 weights and activations).

One emitter per node kind (graph_ops' table), each writing standard ONNX operators. In QDQ form every
activation quantizer becomes QuantizeLinear -> DequantizeLinear (uint8 codes; signed grids use zero point
128), each conv/linear reads DequantizeLinear of its weight codes (per output channel, axis 0) and of
int32 bias codes, so onnxruntime's QDQ fusion turns DQ -> Conv -> Q into QLinearConv, the adds into
QLinearAdd, the pooling into QLinearGlobalAveragePool and the classifier into QGemm. Max-pool and flatten
keep the grid: their outputs get the same Q/DQ pair again, which changes no value and lets the fusion see
quantized tensors on both sides. Weights come from a FrozenCNN: this module never quantizes.

Weight codes follow lowbit.export.onnx_int8's rule: int8 only when every |code| <= 64, else the same values
as uint8 with zero point 128. onnxruntime's uint8 x int8 kernel on x86 CPUs without VNNI (VPMADDUBSW) adds
pairs of products in saturating 16-bit lanes; with full 8-bit weights and ReLU activations near 255 that
cost the digits CNN 3 points of accuracy (96.7% against 99.7% in PyTorch) on an AVX2-only CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import TensorProto, helper, numpy_helper

from lowbit.errors import LowbitError
from lowbit.export.onnx_int8 import signed_kernel_codes
from lowbit.vision.freeze import FrozenCNN
from lowbit.vision.graph_ops import flatten_start_dim, node_kind
from lowbit.vision.quant import XnorConv2d

OPSET = 21
PRECISIONS = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16),
              "qdq": (np.float32, TensorProto.FLOAT)}
EXPORT_VERSION = "1"


class _Graph:
    """Nodes and initializers under construction, the ONNX name of each fx node, and the Q/DQ grid of tensors."""

    def __init__(self, gm: fx.GraphModule, precision: str, frozen: FrozenCNN | None):
        self.gm, self.precision, self.frozen = gm, precision, frozen
        self.dtype, self.elem = PRECISIONS[precision]
        self.modules = dict(gm.named_modules())
        self.nodes: list = []
        self.inits: list = []
        self.names: dict[fx.Node, str] = {}
        self.grids: dict[str, tuple[str, str]] = {}
        self.inputs: list = []
        self.outputs: list = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def qdq(self, x: str, scale: str, zero: str, name: str) -> str:
        codes = self.op("QuantizeLinear", [x, scale, zero], f"{name}/q")
        out = self.op("DequantizeLinear", [codes, scale, zero], f"{name}/dq")
        self.grids[out] = (scale, zero)
        return out

    def arg(self, node: fx.Node, i: int = 0) -> str:
        return self.names[node.args[i]]


def _input(g: _Graph, node: fx.Node, shape: tuple[int, ...]) -> str:
    g.inputs.append(helper.make_tensor_value_info("input", g.elem, ["batch", *shape]))
    return "input"


def _output(g: _Graph, node: fx.Node, shape) -> str:
    g.nodes.append(helper.make_node("Identity", [g.arg(node)], ["logits"], name="logits"))
    g.outputs.append(helper.make_tensor_value_info("logits", g.elem, ["batch", None]))
    return "logits"


def _actquant(g: _Graph, node: fx.Node, shape) -> str:
    if g.precision != "qdq":
        raise LowbitError("this model has activation quantizers; export it with precision='qdq'")
    act = g.frozen.acts[node.target]
    if act.bits != 8:
        raise LowbitError(f"{node.target}: ONNX QDQ export writes 8-bit activations, not {act.bits}-bit; "
                          "export the int8 scheme (W4A4 and XNOR models stay in PyTorch)")
    scale = g.const(f"{node.target}.scale", np.array(act.step, np.float32))
    zero = g.const(f"{node.target}.zero_point", np.array(act.zero_point, np.uint8))
    return g.qdq(g.arg(node), scale, zero, node.target)


def _weights(g: _Graph, target: str, module: torch.nn.Module) -> list[str]:
    """Weight and bias operands: float initializers, or DequantizeLinear of the frozen codes."""
    if g.precision != "qdq":
        if hasattr(module, "wq") or isinstance(module, XnorConv2d):
            raise LowbitError(f"{target}: a quantized layer cannot be exported as {g.precision}; export the float model")
        out = [g.const(f"{target}.weight", module.weight.detach().numpy().astype(g.dtype))]
        if module.bias is not None:
            out.append(g.const(f"{target}.bias", module.bias.detach().numpy().astype(g.dtype)))
        return out
    if target not in g.frozen.layers:
        raise LowbitError(f"{target}: no frozen integer weights (binary/XNOR convs have no ONNX integer form)")
    layer = g.frozen.layers[target]
    q = layer.weight
    codes, zero = signed_kernel_codes(q.codes.numpy().reshape(q.shape))
    steps = q.scales.float().numpy().reshape(-1).astype(np.float32)
    # One zero point per channel (0 for int8 codes, 128 for codes shifted to uint8): the same values either way.
    zeros = np.full(steps.shape, zero, zero.dtype)
    w = g.op("DequantizeLinear", [g.const(f"{target}.weight_codes", codes), g.const(f"{target}.weight_scale", steps),
                                  g.const(f"{target}.weight_zero_point", zeros)], f"{target}/weight", axis=0)
    b = g.op("DequantizeLinear", [g.const(f"{target}.bias_codes", layer.bias_codes.numpy()),
                                  g.const(f"{target}.bias_scale", layer.bias_step.numpy().astype(np.float32))],
             f"{target}/bias", axis=0)
    return [w, b]


def _conv(g: _Graph, node: fx.Node, shape) -> str:
    m = g.modules[node.target]
    return g.op("Conv", [g.arg(node), *_weights(g, node.target, m)], node.target,
                kernel_shape=list(m.kernel_size), strides=list(m.stride), pads=list(m.padding) * 2,
                dilations=list(m.dilation), group=m.groups)


def _linear(g: _Graph, node: fx.Node, shape) -> str:
    m = g.modules[node.target]
    return g.op("Gemm", [g.arg(node), *_weights(g, node.target, m)], node.target, transB=1)


def _keep_grid(g: _Graph, x: str, out: str) -> str:
    """Re-quantize a grid-keeping op's output with its input's Q/DQ pair (no value changes)."""
    return g.qdq(out, *g.grids[x], out) if x in g.grids else out


def _maxpool(g: _Graph, node: fx.Node, shape) -> str:
    m = g.modules[node.target]
    pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
    if m.dilation not in (1, (1, 1)) or m.ceil_mode:
        raise LowbitError(f"{node.target}: only MaxPool2d without dilation or ceil_mode is supported")
    out = g.op("MaxPool", [g.arg(node)], node.name, kernel_shape=pair(m.kernel_size),
               strides=pair(m.stride or m.kernel_size), pads=pair(m.padding) * 2)
    return _keep_grid(g, g.arg(node), out)


def _flatten(g: _Graph, node: fx.Node, shape) -> str:
    flatten_start_dim(node)
    return _keep_grid(g, g.arg(node), g.op("Flatten", [g.arg(node)], node.name, axis=1))


def _simple(op_type: str) -> Callable:
    def emit(g: _Graph, node: fx.Node, shape) -> str:
        return g.op(op_type, [g.names[a] for a in node.args if isinstance(a, fx.Node)], node.name)
    return emit


EMITTERS: dict[str, Callable] = {
    "input": _input, "output": _output, "actquant": _actquant, "conv": _conv, "linear": _linear,
    "relu": _simple("Relu"), "add": _simple("Add"), "avgpool": _simple("GlobalAveragePool"),
    "maxpool": _maxpool, "flatten": _flatten, "identity": lambda g, node, shape: g.arg(node),
}


def export_onnx(gm: fx.GraphModule, path: str | Path, input_shape: tuple[int, ...], precision: str = "fp32",
                frozen: FrozenCNN | None = None) -> Path:
    """Write ``gm`` (a BN-folded float or a prepared fake-quant GraphModule) as ONNX; returns the path.

    ``precision``: ``fp32``, ``fp16`` (weights, inputs and outputs in float16) or ``qdq`` (needs ``frozen``).
    ``input_shape`` is (channels, height, width); the batch dimension is dynamic.
    """
    if precision not in PRECISIONS:
        raise LowbitError(f"unknown ONNX precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "qdq" and frozen is None:
        raise LowbitError("QDQ export needs the frozen quantized model (lowbit.vision.freeze.freeze(gm))")
    g = _Graph(gm, precision, frozen)
    for node in gm.graph.nodes:
        g.names[node] = EMITTERS[node_kind(node, g.modules)](g, node, tuple(input_shape))
    graph = helper.make_graph(g.nodes, "lowbit_cnn", g.inputs, g.outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lowbit")
    model.ir_version = 10
    helper.set_model_props(model, {"lowbit_export_version": EXPORT_VERSION, "precision": precision})
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path
