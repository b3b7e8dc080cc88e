"""A small editor for ONNX graphs: unique names, new constants, and nodes replaced in place.

Rewrites replace one node (a MatMul, a Gather) by a short chain of nodes that computes the same output
name, and may delete nodes that the chain absorbs (the bias Add). Replacing in place keeps the node list
topologically sorted, because every new node only reads the replaced node's inputs or constants.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class GraphEdit:
    """Collects replacements for a graph, then applies them all at once (``apply``).

    ``types`` maps tensor names of the original graph to their inferred ValueInfo; ``same_type`` uses it to
    annotate new tensors whose shape standard inference cannot follow (outputs of com.microsoft operators),
    so that onnxruntime's shape-dependent fusions (SkipLayerNormalization, BiasGelu) still apply after them.
    """

    def __init__(self, graph, types: dict | None = None):
        self.graph = graph
        self.types = types or {}
        self._annotations: list = []
        self._taken = {n.name for n in graph.node} | {v for n in graph.node for v in (*n.input, *n.output)}
        self._taken |= {i.name for i in graph.initializer} | {i.name for i in graph.input}
        self._replacements: dict[str, list] = {}
        self._removed: set[str] = set()
        self._current: list | None = None
        self._new_initializers: list = []
        self.opsets: dict[str, int] = {}

    def unique(self, hint: str) -> str:
        """A tensor or node name not used anywhere in the graph yet."""
        name, i = hint, 1
        while name in self._taken:
            name, i = f"{hint}_{i}", i + 1
        self._taken.add(name)
        return name

    def const(self, hint: str, array: np.ndarray, data_type: int | None = None) -> str:
        """Add a constant (initializer); ``data_type`` stores it as another ONNX type (e.g. INT4)."""
        from onnx import helper, numpy_helper

        name = self.unique(hint)
        if data_type is None:
            tensor = numpy_helper.from_array(np.asarray(array), name)
        else:
            array = np.asarray(array)
            tensor = helper.make_tensor(name, data_type, array.shape, array.flatten().tolist())
        self._new_initializers.append(tensor)
        return name

    def replace(self, node_name: str, removed: Sequence[str] = ()) -> "GraphEdit":
        """Start the chain that replaces node ``node_name``; ``removed`` nodes are dropped from the graph."""
        self._current = self._replacements.setdefault(node_name, [])
        self._removed.update(removed)
        return self

    def node(self, op: str, inputs: Sequence[str], hint: str, outputs: Sequence[str] | None = None,
             domain: str = "", n_outputs: int = 1, **attrs) -> str | list[str]:
        """Append a node to the current chain; returns its output name (a list when there are several)."""
        from onnx import helper

        if self._current is None:
            raise RuntimeError("call replace() before node()")
        outs = list(outputs) if outputs is not None else [self.unique(f"{hint}/{op}_out{i or ''}") for i in range(n_outputs)]
        self._current.append(helper.make_node(op, list(inputs), outs, name=self.unique(f"{hint}/{op}"),
                                              domain=domain, **attrs))
        if domain:
            self.opsets.setdefault(domain, 1)
        return outs[0] if len(outs) == 1 else outs

    def same_type(self, name: str, like: str, elem_type: int | None = None) -> None:
        """Record that tensor ``name`` has the shape of original tensor ``like`` (and ``elem_type`` if given)."""
        from onnx import helper

        known = self.types.get(like)
        if known is None or not known.type.tensor_type.HasField("shape"):
            return
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in known.type.tensor_type.shape.dim]
        self._annotations.append(helper.make_tensor_value_info(
            name, elem_type or known.type.tensor_type.elem_type, dims))

    def apply(self) -> None:
        """Rebuild the node list with every replacement, add the new constants, drop unused constants."""
        nodes = []
        for node in self.graph.node:
            if node.name in self._replacements:
                nodes.extend(self._replacements[node.name])
            elif node.name not in self._removed:
                nodes.append(node)
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self.graph.initializer.extend(self._new_initializers)
        used = {name for n in self.graph.node for name in n.input} | {o.name for o in self.graph.output}
        keep = [i for i in self.graph.initializer if i.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        self.graph.value_info.extend(self._annotations)
        self._annotations = []
        self._replacements.clear()
        self._removed.clear()
        self._new_initializers = []


def set_opsets(model, opsets: dict[str, int]) -> None:
    """Make sure the model imports every operator domain the rewrites used."""
    from onnx import helper

    have = {o.domain for o in model.opset_import}
    for domain, version in opsets.items():
        if domain not in have:
            model.opset_import.append(helper.make_opsetid(domain, version))


def inferred_types(model) -> dict:
    """Name -> ValueInfo of every tensor whose type standard ONNX inference (with data propagation) finds."""
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model, data_prop=True)
    graph = inferred.graph
    return {v.name: v for v in (*graph.value_info, *graph.input, *graph.output)}


def with_inferred_shapes(model):
    """The model with its tensors' inferred shapes stored as value_info (engines' fusions need them)."""
    from onnx import shape_inference

    return shape_inference.infer_shapes(model, data_prop=True)
