"""Finding a model's repeated blocks and feeding them their own inputs.

The blocks are where the architecture table (``lowbit.arch``) says; for a family not in the table, the
children of the ``nn.ModuleList`` that holds most of the model's parameters (decoder layers of an LLM,
encoder layers of BERT). Their inputs are captured with a forward pre-hook on the first
block that stops the forward pass right there, so the embeddings run once and nothing after them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from lowbit.arch import family_of
from lowbit.errors import LowbitError


@dataclass
class BlockInput:
    """One calibration batch as the blocks see it: hidden states plus the keyword arguments of the call."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


class _Stop(Exception):
    pass


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, module list) of the repeated blocks: where the architecture table says they are, else
    the ModuleList holding the most parameters."""
    family = family_of(model)
    for path in family.blocks if family else ():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(p.numel() for p in module.parameters())
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        raise LowbitError("this model has no repeated blocks (nn.ModuleList); calibrated methods need them")
    return best


def capture_inputs(model: nn.Module, first_block: nn.Module, ids: torch.Tensor, batch_size: int) -> list[BlockInput]:
    """Run the model on ``ids`` (n x length) batch by batch up to the first block; keep what it receives."""
    captured: list[BlockInput] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        captured.append(BlockInput(hidden.detach(), kwargs))
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                try:
                    model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: Iterable[BlockInput]) -> list[BlockInput]:
    """The block's outputs for every batch, as inputs of the next block."""
    outputs = []
    with torch.no_grad():
        for batch in inputs:
            out = block(batch.hidden, **batch.kwargs)
            outputs.append(BlockInput(out[0] if isinstance(out, tuple) else out, batch.kwargs))
    return outputs
