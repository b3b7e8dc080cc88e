"""Which operation produces which linears' input: the places a per-channel scale can be folded.

Names are relative to one block. A mapping applies only where every name exists and the producer's
output width equals the consumers' input width (v_proj -> o_proj is skipped under grouped-query attention).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ScaleMapping:
    """``producer``'s output channels feed every module in ``consumers``."""

    producer: str
    consumers: tuple[str, ...]


LLAMA_STYLE = (
    ScaleMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleMapping("mlp.up_proj", ("mlp.down_proj",)),
)


def producer_width(module: nn.Module) -> int | None:
    """Output channels of a norm (1-D weight) or linear."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    return weight.shape[0]


def applicable_mappings(block: nn.Module, mappings=LLAMA_STYLE) -> list[tuple[ScaleMapping, nn.Module, list[nn.Linear]]]:
    """The mappings that exist in ``block`` with matching widths, with their modules."""
    modules = dict(block.named_modules())
    found = []
    for m in mappings:
        if m.producer not in modules or not all(c in modules for c in m.consumers):
            continue
        producer = modules[m.producer]
        consumers = [modules[c] for c in m.consumers]
        if all(isinstance(c, nn.Linear) and c.in_features == producer_width(producer) for c in consumers):
            found.append((m, producer, consumers))
    return found


def fold_scales(producer: nn.Module, consumers: list[nn.Linear], scales) -> None:
    """Divide the producer's output channels by ``scales`` and multiply the consumers' input columns by them."""
    producer.weight.data.div_(scales.view(-1, *([1] * (producer.weight.dim() - 1))).to(producer.weight.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.data.div_(scales.to(producer.bias.dtype))
    for linear in consumers:
        linear.weight.data.mul_(scales[None, :].to(linear.weight.dtype))
