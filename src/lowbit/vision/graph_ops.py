"""What each node of a traced CNN is, as one small table: quantization and ONNX export both read it.

Kinds: ``input``, ``output``, ``conv``, ``linear``, ``relu``, ``add``, ``avgpool`` (global), ``maxpool``,
``flatten``, ``identity``, ``actquant``. Kinds in PASS_THROUGH keep values on the grid they came in on
(a max, a reshape), so a quantized tensor stays quantized through them with the same step.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.vision.quant import ActQuant

MODULE_KINDS: dict[type, str] = {
    ActQuant: "actquant",
    nn.Conv2d: "conv",
    nn.Linear: "linear",
    nn.ReLU: "relu",
    nn.AdaptiveAvgPool2d: "avgpool",
    nn.MaxPool2d: "maxpool",
    nn.Flatten: "flatten",
    nn.Identity: "identity",
}
FUNCTION_KINDS: dict[object, str] = {
    operator.add: "add", torch.add: "add", torch.flatten: "flatten", torch.relu: "relu", F.relu: "relu",
}
METHOD_KINDS = {"add": "add", "flatten": "flatten", "relu": "relu"}
PLACEHOLDER_KINDS = {"placeholder": "input", "output": "output"}
PASS_THROUGH = ("maxpool", "flatten", "identity")


def node_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The kind of ``node``, or a one-line error naming the operation lowbit's CNN support lacks."""
    if node.op in PLACEHOLDER_KINDS:
        return PLACEHOLDER_KINDS[node.op]
    if node.op == "call_module":
        module = modules[node.target]
        for cls in type(module).__mro__:
            if cls in MODULE_KINDS:
                return _check_module(MODULE_KINDS[cls], module, node)
        what = type(module).__name__
    elif node.op == "call_function":
        kind = FUNCTION_KINDS.get(node.target)
        if kind is not None:
            return kind
        what = getattr(node.target, "__name__", str(node.target))
    elif node.op == "call_method" and node.target in METHOD_KINDS:
        return METHOD_KINDS[node.target]
    else:
        what = f"{node.op} {node.target}"
    raise LowbitError(f"CNN quantization does not support {what} (node {node.name}); supported: "
                      "Conv2d, Linear, ReLU, add, MaxPool2d, global AdaptiveAvgPool2d, flatten")


def _check_module(kind: str, module: nn.Module, node: fx.Node) -> str:
    if kind == "avgpool" and module.output_size not in (1, (1, 1)):
        raise LowbitError(f"{node.target}: only global average pooling (output size 1) is supported")
    if kind == "conv" and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
        raise LowbitError(f"{node.target}: only zero padding given as numbers is supported")
    return kind


def flatten_start_dim(node: fx.Node) -> int:
    """The ``start_dim`` of a flatten node (1 for nn.Flatten); only flattening from dimension 1 is supported."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 1 if node.op == "call_module" else 0)
    if dim != 1:
        raise LowbitError(f"{node.name}: only flatten(x, 1) is supported, got start_dim={dim}")
    return dim
