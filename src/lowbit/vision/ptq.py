"""Post-training quantization of a CNN: fold BatchNorm, place activation quantizers, swap layers, calibrate.

Activation quantizers go where an integer engine needs a quantized tensor: on every tensor that a conv, a
linear, a residual add or the average pool reads (looking through max-pool and flatten, which keep the
grid). A conv followed by a ReLU is quantized after the ReLU, on the unsigned grid (an engine fuses the
ReLU into the requantization); a tensor that may be negative uses the signed grid. The last linear's output
stays float (the logits). The resulting GraphModule is also what QAT trains and what ONNX export reads.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from lowbit.vision.fold import fold_batchnorm
from lowbit.vision.graph_ops import PASS_THROUGH, node_kind
from lowbit.vision.quant import ActQuant, QConv2d, QLinear, XnorConv2d
from lowbit.vision.schemes import CNNScheme, get_scheme

QUANTIZED_READERS = ("conv", "linear", "add", "avgpool")


def prepare(model: nn.Module, scheme: CNNScheme | str) -> fx.GraphModule:
    """A traced, BN-folded copy of ``model`` with fake-quant layers and (uncalibrated) activation quantizers."""
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    gm = fold_batchnorm(model)
    modules = dict(gm.named_modules())
    kinds = {n: node_kind(n, modules) for n in gm.graph.nodes}
    weighted = [n for n in gm.graph.nodes if kinds[n] in ("conv", "linear")]
    edges = {weighted[0], weighted[-1]} if scheme.edge_weight else set()
    for node in weighted:
        _swap_layer(gm, node, kinds[node], scheme, node in edges)
    nodes = list(gm.graph.nodes)
    readers = {n: _effective_readers(n, kinds) for n in nodes}  # before any insertion changes the users
    signed = {n: not _nonnegative(n, kinds) for n in nodes if kinds[n] != "output"}
    for i, node in enumerate(nodes):
        if kinds[node] in PASS_THROUGH + ("output",) or not any(kinds[r] in QUANTIZED_READERS for r in readers[node]):
            continue
        edge_only = bool(edges) and all(r in edges for r in readers[node] if kinds[r] in ("conv", "linear"))
        bits = scheme.edge_act_bits if edge_only and scheme.edge_act_bits else scheme.act_bits
        _insert_after(gm, node, f"act_quant_{i}", ActQuant(bits, signed[node], scheme.observer))
    gm.graph.lint()
    gm.recompile()
    return gm.eval()


@torch.no_grad()
def calibrate(gm: fx.GraphModule, images: torch.Tensor, batch_size: int = 256, sequential: bool = True) -> fx.GraphModule:
    """Set activation steps (and XNOR input thresholds) from ``images``, in graph order.

    ``sequential``: quantizers are calibrated one after another, each seeing the outputs of the
    already-quantized layers before it, so every range is measured on what the quantized model really feeds
    it (one pass per quantizer: cheap for small nets, needed for XNOR). Otherwise one float pass observes all.
    """
    gm.eval()
    observers = [m for m in gm.modules() if hasattr(m, "start_observing")]
    for group in ([[m] for m in observers] if sequential else [observers]):
        for m in group:
            m.start_observing()
        for i in range(0, len(images), batch_size):
            gm(images[i:i + batch_size])
        for m in group:
            m.finish_observing()
    return gm


def quantize_cnn(model: nn.Module, scheme: CNNScheme | str, calibration_images: torch.Tensor) -> fx.GraphModule:
    """PTQ in one call: ``prepare`` then ``calibrate`` on the given images (e.g. training images)."""
    return calibrate(prepare(model, scheme), calibration_images)


def _swap_layer(gm: fx.GraphModule, node: fx.Node, kind: str, scheme: CNNScheme, edge: bool) -> None:
    old = gm.get_submodule(node.target)
    spec = scheme.edge_weight if edge else scheme.weight
    if spec == "binary":
        if kind != "conv":
            raise ValueError("binary weights are for inner convs; keep the last linear as an edge layer")
        new = XnorConv2d.from_float(old)
    else:
        new = (QConv2d if kind == "conv" else QLinear).from_float(old, spec)
    parent, _, name = node.target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, new)


def _effective_readers(node: fx.Node, kinds: dict) -> list[fx.Node]:
    """Nodes that read ``node``'s value, looking through pass-through nodes."""
    out = []
    for user in node.users:
        out.extend(_effective_readers(user, kinds) if kinds.get(user) in PASS_THROUGH else [user])
    return out


def _nonnegative(node: fx.Node, kinds: dict) -> bool:
    """Whether ``node``'s value is known to be >= 0 (a ReLU, or pooling/reshaping of one)."""
    kind = kinds[node]
    if kind == "relu":
        return True
    if kind in PASS_THROUGH + ("avgpool",):
        return _nonnegative(node.args[0], kinds)
    return False


def _insert_after(gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module) -> None:
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        q = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
