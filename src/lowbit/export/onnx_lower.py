"""Rewrite a traced graph so that each module lowbit quantized computes from its stored integer codes.

Given the fake-quant model (a ``QuantizedModel``: QTensors plus attached input quantizers), every
quantized linear becomes an integer-kernel chain (``onnx_int8``; optionally one product for the linears that
read the same input), a weight-only ``MatMulNBits`` node (``onnx_nbits``) or a QDQ chain (``onnx_qdq``), and every
quantized embedding a Gather over a DequantizeLinear table. Returns how each module was lowered.

``residual_sums`` rewrites the Adds that feed a LayerNormalization (residual connections) as Sum, which
computes the same float32 sums; onnxruntime fuses an Add + LayerNormalization, never a Sum, into its CPU
SkipLayerNormalization kernel, which is scalar (a serial sum and a division per element) and measured ~4x
slower than its vectorized LayerNormalization plus the two Adds (onnxruntime 1.32, 32 x 128 x 384: 8.0 vs
1.9 ms on one thread).
"""

from __future__ import annotations

from lowbit.export.onnx_graph import GraphEdit, inferred_types, set_opsets
from lowbit.export.onnx_int8 import Int8Lowering, IntegerLinear, integer_kernel_ready
from lowbit.export.onnx_nbits import nbits_linear, nbits_ready
from lowbit.export.onnx_qdq import qdq_embedding, qdq_linear
from lowbit.export.onnx_sites import ensure_node_names, find_sites
from lowbit.export.onnx_weights import onnx_weight
from lowbit.model.act_quant import input_quantizers
from lowbit.model.apply import QuantizedModel

INT8 = "int8"
NBITS = "matmulnbits"
QDQ = "qdq"
ABSENT = "absent"


def lower_quantized(proto, quantized: QuantizedModel, integer: bool, matmul_nbits: bool = False,
                    accuracy_level: int = 0, fuse: bool = False) -> dict[str, str]:
    """Rewrite ``proto`` in place; ``integer`` picks MatMulInteger where the spec allows (``fuse``: one product
    for the linears that read the same input), ``matmul_nbits`` MatMulNBits (at ``accuracy_level``) for
    weight-only linears it holds. Module -> lowering."""
    graph = proto.graph
    ensure_node_names(graph)
    modules = {pname.rsplit(".", 1)[0]: qt for pname, qt in quantized.qtensors.items()}
    linears, embeddings, absent = find_sites(graph, quantized.model, list(modules))
    quantizers = input_quantizers(quantized.model)
    edit = GraphEdit(graph, inferred_types(proto))
    lowering = {name: ABSENT for name in absent}
    position = {node.name: i for i, node in enumerate(graph.node)}
    integer_linears = []
    # In graph order, so that nodes shared by several linears are placed before all of their users.
    for name, site in sorted(linears.items(), key=lambda item: position[item[1].matmul]):
        quantizer = quantizers.get(name)
        if matmul_nbits and nbits_ready(modules[name], quantizer is not None):
            nbits_linear(edit, site, modules[name], accuracy_level)
            lowering[name] = NBITS
            continue
        weight = onnx_weight(modules[name], transpose=True, name=name)
        act = None if quantizer is None else quantizer.spec
        scale = None if quantizer is None or quantizer.scale is None else float(quantizer.scale)
        if integer and integer_kernel_ready(weight, act):
            integer_linears.append(IntegerLinear(site, weight, act, scale))
            lowering[name] = INT8
        else:
            qdq_linear(edit, site, weight, act, scale)
            lowering[name] = QDQ
    Int8Lowering(edit, fuse=fuse).lower(integer_linears)
    for name, site in embeddings.items():
        qdq_embedding(edit, site, onnx_weight(modules[name], transpose=False, name=name))
        lowering[name] = QDQ
    edit.apply()
    set_opsets(proto, edit.opsets)
    return lowering


def residual_sums(graph) -> int:
    """Write as Sum every Add of two computed tensors (no constant operand: a residual connection, not a
    bias) whose output feeds a LayerNormalization; returns how many."""
    constants = {init.name for init in graph.initializer}
    norm_inputs = {node.input[0] for node in graph.node if node.op_type == "LayerNormalization"}
    count = 0
    for node in graph.node:
        if (node.op_type == "Add" and node.domain in ("", "ai.onnx") and node.output[0] in norm_inputs
                and not constants.intersection(node.input)):
            node.op_type = "Sum"
            count += 1
    return count
