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

A bf16 pass's outputs stay in bf16 between blocks (``as_stored``): they are exact there, and the next pass
reads them in bf16 anyway. Widening them to fp32, as lowbit first did, held two fp32 copies of the calibration
activations (a block's inputs and outputs) plus a bf16 copy of the inputs for the pass; now a block after the
first holds one bf16 copy of each (on SmolLM2 at 128 x 512 tokens: ~150 MB instead of ~375 MB). Whatever
computes in fp32 (an fp32 pass, the autocast pass, the fp32 redo of an overflowed bf16 pass) widens them
back one batch at a time (``in_fp32``): the same values as before, so the results are bit for bit the same.
The first block's captured inputs (fp32 embeddings) are narrowed the same way when every pass over them is a plain
bf16 one (``narrowed_for``): each such pass casts them to bf16 first, so it computes the same values from half the
bytes; the first block was the run's peak before (on SmolLM2 at 128 x 512: ~80 MB above every later block).
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
        yield in_fp32
        return
    if input_quantizers(block):
        with torch.autocast("cpu", dtype=dtype):
            yield in_fp32
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


def as_stored(outputs: list[BlockInput], inputs: list[BlockInput]) -> list[BlockInput]:
    """A pass's outputs as the next block's inputs: hidden states in the dtype they were computed in (exact
    there), with the keyword arguments of the uncast input batches."""
    return [BlockInput(o.hidden, b.kwargs) for o, b in zip(outputs, inputs)]


def narrowed_for(batches: list[BlockInput], dtype: torch.dtype, fp32_passes: bool) -> list[BlockInput]:
    """Captured first-block inputs held in ``dtype`` when every pass over them casts them to it anyway (a bf16
    run without input quantizers, ``fp32_passes`` False); otherwise as they are. Only the fp32 redo of an
    overflowed bf16 pass then starts from the rounded values, as it does in every later block."""
    if dtype == torch.float32 or fp32_passes:
        return batches
    return [BlockInput(b.hidden.to(dtype), b.kwargs) for b in batches]


def in_fp32(batches: Iterable[BlockInput]) -> Iterator[BlockInput]:
    """The batches with fp32 hidden states, widened one batch at a time (fp32 ones pass through, uncopied)."""
    for batch in batches:
        yield batch if batch.hidden.dtype == torch.float32 else BlockInput(batch.hidden.float(), batch.kwargs)


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
