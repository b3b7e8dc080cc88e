"""BatchNorm folding: a Conv2d followed by an inference-mode BatchNorm2d becomes one Conv2d with a bias.

BN(conv(x)) = gamma * (W*x + b - mean) / sqrt(var + eps) + beta, so with k = gamma / sqrt(var + eps)
per output channel the folded conv has W' = k * W and b' = k * (b - mean) + beta: the same function
(up to float rounding), one layer fewer, and the weight that quantization must then represent.
``fold_conv_bn`` is the tensor kernel; ``fold_batchnorm`` finds the pairs in a traced model.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from lowbit.errors import LowbitError


def fold_conv_bn(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
                 gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded (weight, bias) of conv(weight, bias) followed by BatchNorm(mean, var, gamma, beta, eps).

    Computed in float64 and returned in the weight's dtype, so folding adds no error beyond one rounding.
    """
    k = gamma.double() / torch.sqrt(var.double() + eps)
    b = torch.zeros_like(mean, dtype=torch.float64) if bias is None else bias.double()
    w = weight.double() * k.reshape(-1, *([1] * (weight.dim() - 1)))
    return w.to(weight.dtype), (k * (b - mean.double()) + beta.double()).to(weight.dtype)


def trace(model: nn.Module) -> fx.GraphModule:
    """A torch.fx GraphModule of ``model`` (a copy), or a one-line error if it cannot be traced."""
    try:
        return fx.symbolic_trace(copy.deepcopy(model))
    except Exception as exc:  # fx raises many types for data-dependent control flow
        raise LowbitError(f"cannot trace {type(model).__name__} with torch.fx ({exc.__class__.__name__}); "
                          "CNN quantization needs a model without data-dependent control flow") from None


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """A traced copy of ``model`` (evaluated in inference mode) with every Conv2d -> BatchNorm2d pair folded.

    A BatchNorm2d that does not directly follow a Conv2d whose output nothing else reads is refused: it
    could not be folded and would stay as a float layer between quantized ones.
    """
    gm = trace(model.eval())
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or len(src.users) != 1:
            raise LowbitError(f"BatchNorm {node.target} does not follow a Conv2d alone; it cannot be folded")
        bn = modules[node.target]
        w, b = fold_conv_bn(conv.weight.detach(), None if conv.bias is None else conv.bias.detach(),
                            bn.running_mean, bn.running_var, bn.weight.detach(), bn.bias.detach(), bn.eps)
        folded = copy.deepcopy(conv)
        folded.weight = nn.Parameter(w)
        folded.bias = nn.Parameter(b)
        _set_module(gm, src.target, folded)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()


def _set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
