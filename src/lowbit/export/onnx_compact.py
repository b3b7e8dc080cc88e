"""Smaller ONNX files without changing a single computed value: shared tied tables, exact fp16 storage.

- A causal LM whose output head is tied to its input embeddings is traced with the table twice: once as
  the Gather's table and once, transposed, as the head's MatMul operand. ``share_transposed_tables``
  replaces the second copy by a Transpose node of the first.
- Float tensors that lowbit stores in 16 bits (embeddings, norms and kept linears of a lowbit checkpoint)
  hold values that fp16 represents exactly; ``store_exact_fp16`` stores those as fp16 initializers read
  through a Cast to float32.
onnxruntime folds both nodes into float32 constants when the session is created, so the per-run work and
every output are unchanged; only the file shrinks.
"""

from __future__ import annotations

import numpy as np

MIN_ELEMENTS = 4096  # smaller constants are not worth a node


def compact(proto) -> None:
    """Both rewrites, in the order that keeps the node list sorted (a shared Transpose may read a Cast)."""
    share_transposed_tables(proto)
    store_exact_fp16(proto)


def share_transposed_tables(proto) -> list[str]:
    """Replace each 2-D float constant that equals another one's transpose by a Transpose node; returns them."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer
              if i.data_type == 1 and len(i.dims) == 2 and i.dims[0] * i.dims[1] >= MIN_ELEMENTS}
    by_shape: dict[tuple, list[str]] = {}
    for name, array in arrays.items():
        by_shape.setdefault(array.shape, []).append(name)
    replaced: dict[str, str] = {}
    for name, array in arrays.items():
        if name in replaced or name in replaced.values():
            continue
        for other in by_shape.get(array.shape[::-1], []):
            if other != name and other not in replaced and np.array_equal(arrays[other].T, array):
                replaced[name] = other
                break
    if not replaced:
        return []
    keep = [i for i in graph.initializer if i.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = [helper.make_node("Transpose", [source], [name], name=f"{name}/shared_transpose", perm=[1, 0])
             for name, source in replaced.items()]
    _prepend(graph, nodes)
    return sorted(replaced)


def store_exact_fp16(proto) -> list[str]:
    """Store float32 constants whose values are all exact in fp16 as fp16 plus a Cast; returns their names."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    converted, nodes = [], []
    for index, init in enumerate(graph.initializer):
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < MIN_ELEMENTS:
            continue
        array = numpy_helper.to_array(init)
        half = array.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), array, equal_nan=False):
            continue
        name = init.name
        graph.initializer[index].CopyFrom(numpy_helper.from_array(half, f"{name}.fp16"))
        nodes.append(helper.make_node("Cast", [f"{name}.fp16"], [name], name=f"{name}/from_fp16",
                                      to=TensorProto.FLOAT))
        converted.append(name)
    _prepend(graph, nodes)
    return converted


def _prepend(graph, nodes: list) -> None:
    """Put constant-producing nodes first, keeping the node list topologically sorted."""
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
