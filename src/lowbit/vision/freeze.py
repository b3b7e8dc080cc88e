"""Freeze a fake-quant CNN into plain data: per layer the weight QTensor and int32 bias codes, per activation
quantizer its step and zero point. Exporters read only this (they never quantize).

The bias is stored as int32 codes on the step ``input_step * weight_step[c]`` (the accumulator's grid),
as integer kernels (QLinearConv, QGemm) require; rounding it there moves each output by at most half an
accumulator step, far below the output's own quantization step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from lowbit.errors import LowbitError
from lowbit.formats import QTensor
from lowbit.formats.scales import scale_values
from lowbit.vision.graph_ops import PASS_THROUGH, node_kind
from lowbit.vision.quant import ActQuant, QConv2d, QLinear


@dataclass(frozen=True)
class FrozenLayer:
    """One conv/linear: weight codes and per-channel steps (QTensor), int32 bias codes and their steps."""

    weight: QTensor
    bias_codes: torch.Tensor
    bias_step: torch.Tensor


@dataclass(frozen=True)
class FrozenAct:
    """One activation quantizer: step, zero point (unsigned container), bits, and whether the grid is signed."""

    step: float
    zero_point: int
    bits: int
    signed: bool


@dataclass(frozen=True)
class FrozenCNN:
    """Frozen layers and activation quantizers, keyed by module name in the GraphModule."""

    layers: dict[str, FrozenLayer]
    acts: dict[str, FrozenAct]


@torch.no_grad()
def freeze(gm: fx.GraphModule) -> FrozenCNN:
    """Plain data of every quantized layer and activation quantizer of a prepared (calibrated) GraphModule."""
    modules = dict(gm.named_modules())
    acts = {name: FrozenAct(float(m.step), m.zero_point, m.bits, m.signed)
            for name, m in modules.items() if isinstance(m, ActQuant)}
    layers = {}
    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(module, (QConv2d, QLinear)):
            continue
        src = _quantized_source(node.args[0], modules)
        if src is None:
            raise LowbitError(f"{node.target}: its input has no activation quantizer; prepare the model with ptq.prepare")
        weight = module.wq.qtensor(module.weight, name=node.target)
        w_step = scale_values(weight.scales).reshape(-1)
        bias_step = (acts[src].step * w_step).float()
        bias = module.bias if module.bias is not None else torch.zeros_like(w_step)
        layers[node.target] = FrozenLayer(weight, torch.round(bias.float() / bias_step).to(torch.int32), bias_step)
    return FrozenCNN(layers, acts)


def _quantized_source(node: fx.Node, modules: dict) -> str | None:
    """The ActQuant module name whose grid ``node``'s value is on (looking back through pass-through nodes)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module" and isinstance(modules[node.target], ActQuant):
        return node.target
    if node_kind(node, modules) in PASS_THROUGH:
        return _quantized_source(node.args[0], modules)
    return None
