"""The number format a calibration pass computes in: fp32, or bf16 where the CPU has native bf16 units.

A bf16 pass runs the block natively in bf16: its floating parameters are cast for the pass and the very same
fp32 tensors are put back afterwards (bit for bit: the weights the method quantizes are never rounded), and
each batch's hidden states and float keyword arguments (rotary cos/sin, masks) are cast on the way in.
Under autocast instead, every linear's input and output would be cast between fp32 and bf16 and every
elementwise op (norms, rotary, residual adds) would still run in fp32: on SmolLM2 that was half of the
block's time. Causal self-attention in such a pass runs in query chunks (``lowbit.pipeline.attention``:
0.55x the time of PyTorch's fused CPU kernel, which is no faster in bf16 than in fp32). A block holding
input quantizers (W8A8 and friends) runs under autocast, so that its fake quantization still sees fp32
inputs, exactly as evaluation does.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from lowbit.model.act_quant import input_quantizers
from lowbit.pipeline.attention import chunked_attention
from lowbit.pipeline.layers import BlockInput

Cast = Callable[[Iterable[BlockInput]], Iterator[BlockInput]]


@contextlib.contextmanager
def computing_in(block: nn.Module, dtype: torch.dtype) -> Iterator[Cast]:
    """Within this context ``block`` computes in ``dtype``; yields the function that casts its input batches
    (lazily, one batch at a time, so no second copy of the calibration activations is held)."""
    if dtype == torch.float32:
        yield _unchanged
        return
    if input_quantizers(block):
        with torch.autocast("cpu", dtype=dtype):
            yield _unchanged
        return
    params = [p for p in block.parameters() if p.is_floating_point()]
    kept = [p.data for p in params]
    try:
        for p in params:
            p.data = p.data.to(dtype)
        with chunked_attention(block):
            yield lambda batches: (_cast_batch(b, dtype) for b in batches)
    finally:
        for p, data in zip(params, kept):
            p.data = data


def as_float32(outputs: list[BlockInput], inputs: list[BlockInput]) -> list[BlockInput]:
    """A pass's outputs as fp32 hidden states, with the keyword arguments of the uncast input batches."""
    return [BlockInput(o.hidden.float(), b.kwargs) for o, b in zip(outputs, inputs)]


def _unchanged(batches: Iterable[BlockInput]) -> Iterator[BlockInput]:
    return iter(batches)


def _cast_batch(batch: BlockInput, dtype: torch.dtype) -> BlockInput:
    return BlockInput(batch.hidden.to(dtype), {k: _cast_value(v, dtype) for k, v in batch.kwargs.items()})


def _cast_value(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors (also inside tuples and lists: rotary (cos, sin)) in ``dtype``; anything else as is.

    Values are clamped to ``dtype``'s finite range first: an additive mask's fp32 minimum (-3.40e38) would
    round to -inf in bf16, and a row masked entirely would then give NaN instead of a finite softmax."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            return value
        info = torch.finfo(dtype)
        return value.clamp(info.min, info.max).to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_value(v, dtype) for v in value)
    return value
