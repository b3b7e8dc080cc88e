"""Find, in a traced ONNX graph, the nodes that compute each quantized module of the torch model.

The exporter renames and transposes constants, so modules are matched by value: an ``nn.Linear`` is the
MatMul whose constant right operand equals ``weight.T`` exactly (followed by the Add of a constant equal to
its bias, if it has one); an ``nn.Embedding`` is the Gather whose constant table equals its weight.
Matching by value is independent of the exporter's naming, and it proves that the constant about to be
replaced holds exactly the weights lowbit quantized. The exporter stores equal constants once and refers to
the copies through Identity nodes (e.g. all-zero biases); those aliases are followed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class LinearSite:
    """One ``nn.Linear`` in the graph: MatMul(input, weight_init) [-> Add(bias_init)] -> output.

    ``bias`` holds the bias constant's values (for rewrites that join several linears' biases).
    """

    module: str
    matmul: str
    input: str
    weight_init: str
    bias_init: str | None
    bias_add: str | None
    output: str
    bias: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class EmbeddingSite:
    """One ``nn.Embedding`` in the graph: Gather(table_init, indices) -> output, along axis 0."""

    module: str
    gather: str
    table_init: str
    indices: str
    output: str


def _digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha1(array.tobytes() + str(array.shape).encode()).hexdigest()


def _consumers(graph, alias: dict[str, str]) -> dict[str, list]:
    """Constant or tensor name -> the nodes reading it (through Identity aliases of constants too)."""
    users: dict[str, list] = {}
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] in alias:
            continue
        for name in node.input:
            users.setdefault(alias.get(name, name), []).append(node)
    return users


def _aliases(graph, inits: dict[str, np.ndarray]) -> dict[str, str]:
    """Output of Identity(constant) -> that constant's name."""
    return {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}


def _initializer_arrays(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


def find_sites(graph, model: nn.Module, modules: list[str]
               ) -> tuple[dict[str, LinearSite], dict[str, EmbeddingSite], list[str]]:
    """The graph sites of the named Linear and Embedding modules, and the modules absent from the graph.

    A module whose weight appears nowhere in the graph does not contribute to its output (a pooler the
    exporter pruned) and is listed as absent; one whose weight appears in another pattern is an error.
    """
    inits = _initializer_arrays(graph)
    by_value: dict[str, str] = {}
    for name, array in inits.items():
        if array.dtype == np.float32 and array.ndim == 2:
            by_value.setdefault(_digest(array), name)
    alias = _aliases(graph, inits)
    users = _consumers(graph, alias)
    taken: set[str] = set()
    named = dict(model.named_modules())
    linears: dict[str, LinearSite] = {}
    embeddings: dict[str, EmbeddingSite] = {}
    absent: list[str] = []
    for module_name in modules:
        module = named[module_name]
        weight = module.weight.detach().float().cpu().numpy()
        if _digest(weight.T) not in by_value and _digest(weight) not in by_value:
            absent.append(module_name)
            continue
        if isinstance(module, nn.Linear):
            init = by_value.get(_digest(weight.T))
            site = _linear_site(module_name, module, init, users, inits, alias, taken) if init else None
            if site is not None:
                linears[module_name] = site
                taken.add(site.matmul)
                continue
        elif isinstance(module, nn.Embedding):
            init = by_value.get(_digest(weight))
            gathers = [n for n in users.get(init, []) if n.op_type == "Gather" and n.name not in taken
                       and alias.get(n.input[0], n.input[0]) == init
                       and all(a.i == 0 for a in n.attribute if a.name == "axis")] if init else []
            if gathers:
                g = gathers[0]
                embeddings[module_name] = EmbeddingSite(module_name, g.name, init, g.input[1], g.output[0])
                continue
        raise LowbitError(f"cannot find {module_name} ({type(module).__name__}) in the traced ONNX graph; "
                          "keep it in float (--keep) or report this model")
    return linears, embeddings, absent


def _linear_site(name: str, module: nn.Linear, init: str, users: dict[str, list], inits: dict[str, np.ndarray],
                 alias: dict[str, str], taken: set[str]) -> LinearSite | None:
    """The first MatMul not yet claimed whose right operand is ``init`` [followed by Add(bias)]."""
    bias = None if module.bias is None else module.bias.detach().float().cpu().numpy()
    for matmul in users.get(init, []):
        if matmul.op_type != "MatMul" or alias.get(matmul.input[1], matmul.input[1]) != init or matmul.name in taken:
            continue
        if bias is None:
            return LinearSite(name, matmul.name, matmul.input[0], init, None, None, matmul.output[0])
        adds = users.get(matmul.output[0], [])
        if len(adds) != 1 or adds[0].op_type != "Add":
            continue
        add = adds[0]
        bias_name = add.input[1] if add.input[0] == matmul.output[0] else add.input[0]
        stored = inits.get(alias.get(bias_name, bias_name))
        if stored is not None and stored.shape == bias.shape and np.array_equal(stored, bias):
            return LinearSite(name, matmul.name, matmul.input[0], init, bias_name, add.name, add.output[0], stored)
    return None


def ensure_node_names(graph) -> None:
    """Give every unnamed node a unique name (sites refer to nodes by name)."""
    taken = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{i}"
            while candidate in taken:
                candidate += "_"
            node.name = candidate
            taken.add(candidate)
