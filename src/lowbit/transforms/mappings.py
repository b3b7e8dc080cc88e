"""Where a per-channel scale can be folded: the producer/consumer pairs the architecture table lists.

Names are relative to one block (``lowbit.arch.families``). A pair applies only where every name exists and
the producer's output width equals the consumers' input width (v_proj -> o_proj is skipped under
grouped-query attention). Folding respects the family's norm convention: a norm that multiplies by
``offset + weight`` (Gemma: 1 + weight) gets ``(offset + weight) / s - offset``.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.arch import ScalePair


def producer_width(module: nn.Module) -> int | None:
    """Output channels of a norm (1-D weight) or linear."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    return weight.shape[0]


def applicable_mappings(block: nn.Module, pairs: tuple[ScalePair, ...]) -> list[tuple[ScalePair, nn.Module, list[nn.Linear]]]:
    """The pairs that exist in ``block`` with matching widths, with their modules."""
    modules = dict(block.named_modules())
    found = []
    for m in pairs:
        if m.producer not in modules or not all(c in modules for c in m.consumers):
            continue
        producer = modules[m.producer]
        consumers = [modules[c] for c in m.consumers]
        if all(isinstance(c, nn.Linear) and c.in_features == producer_width(producer) for c in consumers):
            found.append((m, producer, consumers))
    return found


def fold_scales(producer: nn.Module, consumers: list[nn.Linear], scales: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Divide the producer's output channels by ``scales`` and multiply the consumers' input columns by them.

    ``norm_offset`` applies to norms (1-D weights) that multiply by ``norm_offset + weight``.
    """
    weight = producer.weight.data
    if weight.dim() == 1 and norm_offset:
        weight.copy_(((weight.double() + norm_offset) / scales.double() - norm_offset).to(weight.dtype))
    else:
        weight.div_(scales.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.data.div_(scales.to(producer.bias.dtype))
    for linear in consumers:
        linear.weight.data.mul_(scales[None, :].to(linear.weight.dtype))
