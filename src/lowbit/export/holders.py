"""Which output formats can hold a spec: the one-line error an exporter gives for a spec it cannot write.

The Hugging Face exporters each say what they hold (``holds``); GGUF writes its own block types from the
float model, so it is named for the number formats it has a type for. A spec no other format holds stays
in lowbit's own checkpoint (``lowbit eval`` reads it; the fake-quant model runs anywhere transformers does).
GPTQ and AWQ also share here how they store what they hold: unsigned codes with a zero point for every
group, and scales that must be exact in float16.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats.qtensor import QTensor
from lowbit.formats.spec import QuantSpec

GGUF_TYPES = {
    "ternary": "TQ1_0/TQ2_0",
    "mxfp4": "MXFP4",
    "int8": "Q8_0",
    "int4": "Q4_0/Q4_1/Q4_K",
    "int5": "Q5_0/Q5_1/Q5_K",
    "int3": "Q3_K",
    "int2": "Q2_K",
    "int6": "Q6_K",
}


def formats_that_hold(spec: QuantSpec) -> list[str]:
    """Human-readable names of the output formats (with their command) that can store ``spec``."""
    from lowbit.export import awq, ct_formats, gptq

    found = ["lowbit checkpoint (`lowbit quantize`)"]
    if any(f.holds(spec) for f in ct_formats.FORMATS):
        found.append("compressed-tensors (`lowbit export hf`)")
    if gptq.holds(spec):
        found.append("GPTQ (`lowbit export gptq`)")
    if awq.holds(spec):
        found.append("AWQ GEMM (`lowbit export awq`)")
    if spec.format in GGUF_TYPES:
        found.append(f"GGUF {GGUF_TYPES[spec.format]} (`lowbit export gguf`, from the float model)")
    return found


def cannot_hold(name: str, spec: QuantSpec, target: str, holds: str) -> str:
    """The one-line refusal: what cannot be written where, what that format holds, and where it fits."""
    return (f"{name}: {spec} cannot be written as {target}, which holds {holds}; "
            f"formats that hold {spec}: {', '.join(formats_that_hold(spec))}")


def check_integer_zeros(name: str, qt: QTensor, target: str) -> None:
    """Refuse float zero points (HQQ's): the Hugging Face formats store integer zero points only."""
    if qt.zeros is not None and qt.zeros.is_floating_point():
        raise LowbitError(f"{name}: its zero points are floats (method hqq), and {target} stores integer zero "
                          "points; re-quantize with --method rtn/gptq/awq, or keep the lowbit checkpoint")


def unsigned_codes(qt: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned codes [out, in] and zero points [out, n_groups] (symmetric: codes + 2^(b-1), z = 2^(b-1)).

    GPTQ and AWQ store unsigned codes with a zero point for every group, so a symmetric spec is written
    with the zero point at the middle of the unsigned range: ``s * ((c + 2^(b-1)) - 2^(b-1)) = s * c``.
    """
    if qt.zeros is not None:
        return qt.codes.to(torch.int32), qt.zeros.to(torch.int32)
    offset = 1 << (qt.spec.bits - 1)
    return qt.codes.to(torch.int32) + offset, torch.full(tuple(qt.scales.shape), offset, dtype=torch.int32)


def fp16_scales(name: str, scales: torch.Tensor, target: str) -> torch.Tensor:
    """Scales as float16, refusing values fp16 cannot hold exactly (GPTQ and AWQ store fp16 scales only)."""
    half = scales.to(torch.float16)
    if not torch.equal(half.to(torch.float32), scales.to(torch.float32)):
        raise LowbitError(f"{name}: {target} stores float16 scales and these {scales.dtype} scales are not all exact "
                          "in float16; re-quantize with fp16 scales (the default spec, no scale=...)")
    return half
