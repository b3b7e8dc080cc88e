"""GPT-2-style ``Conv1D`` projections turned into ``nn.Linear`` when a model is loaded.

transformers' ``Conv1D`` computes ``x @ W + b`` with ``W`` stored as [in, out]: the transpose of a linear.
Every quantizer, grouping rule, transform and exporter in lowbit works on [out, in] rows grouped along the
input dimension, so instead of teaching each of them the transposed layout, the model is normalized once:
each ``Conv1D`` becomes an ``nn.Linear`` with the transposed weight (the same function, bit for bit).
llama.cpp stores GPT-2's projections in this [out, in] layout too. Checkpoints written afterwards hold
the linear layout; ``load_checkpoint`` normalizes the freshly built model the same way before loading.
"""

from __future__ import annotations

from torch import nn


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def linearize_conv1d(model: nn.Module) -> int:
    """Replace every transformers ``Conv1D`` in ``model`` by an equivalent ``nn.Linear``; returns how many."""
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not _is_conv1d(child):
                continue
            n_in, n_out = child.weight.shape
            linear = nn.Linear(n_in, n_out, bias=child.bias is not None, device="meta")
            linear.weight = nn.Parameter(child.weight.data.t().contiguous(), requires_grad=child.weight.requires_grad)
            if child.bias is not None:
                linear.bias = child.bias
            setattr(parent, child_name, linear)
            replaced += 1
    return replaced


def has_conv1d(model: nn.Module) -> bool:
    """Whether ``model`` still holds a transposed ``Conv1D`` projection."""
    return any(_is_conv1d(m) for m in model.modules())

