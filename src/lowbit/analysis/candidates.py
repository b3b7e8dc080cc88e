"""The precisions an allocation chooses from, what each costs in bits, and which output formats can hold it.

A candidate is a lowbit spec (``int4:g128:asym``, ``nvfp4``, ...), ``keep`` (the float dtype), or a GGUF block
type (``Q4_K``, ``Q5_0``, ...). Costs are exact storage bits for a weight of a given shape: codes, scales, zero
points and global scales for a spec (``lowbit.eval.estimate.spec_bytes``), whole blocks for a GGUF type. A
candidate that does not fit a shape (an NVFP4 row that is not whole blocks; a GGUF row that is not whole
blocks, llama.cpp's row rule) is simply not offered for that weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from lowbit.errors import LowbitError
from lowbit.eval.estimate import spec_bytes
from lowbit.formats.spec import QuantSpec, parse_spec

KEEP = "keep"
FLOAT_BITS = {"fp16": 16, "bf16": 16, "fp32": 32}
# The default GGUF candidates: legacy, k-quant and IQ4 types (fast to measure on every tensor) and F16.
GGUF_CANDIDATES = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "IQ4_NL", "IQ4_XS",
                   "F16")
# Also offered when asked for (--candidates): the lattice and ternary i-quants, whose exhaustive searches cost
# 2-6 s per million weights each, too slow to try on every tensor by default.
GGUF_OPTIONAL = ("IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "TQ2_0", "TQ1_0", "MXFP4")
GGUF_PROBE = "Q3_K"


@dataclass(frozen=True)
class Candidate:
    """One precision a weight may get: a lowbit spec, ``keep`` (float), or a GGUF block type."""

    name: str
    spec: QuantSpec | None = None
    gguf_type: str | None = None
    float_bits: int = 16

    @property
    def is_gguf(self) -> bool:
        return self.gguf_type is not None

    def fits(self, rows: int, cols: int) -> bool:
        """Whether a (rows, cols) weight can be stored this way."""
        if self.gguf_type is not None:
            return cols % _gguf_block(self.gguf_type)[0] == 0
        if self.spec is None:
            return True
        try:
            self.spec.check_shape(rows, cols)
        except LowbitError:
            return False
        return True

    def bits(self, rows: int, cols: int) -> int:
        """Stored bits of a (rows, cols) weight."""
        if self.gguf_type is not None:
            block, size = _gguf_block(self.gguf_type)
            return 8 * rows * (cols // block) * size
        if self.spec is None:
            return rows * cols * self.float_bits
        return 8 * spec_bytes(self.spec, rows, cols)

    def bits_per_weight(self, rows: int = 576, cols: int = 1536) -> float:
        return self.bits(rows, cols) / (rows * cols)

    def dequantized(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` (rows, cols) after a round trip through this candidate (RTN for specs, llama.cpp's
        importance-weighted block quantization for GGUF types), float32."""
        w = weight.detach().float()
        if self.gguf_type is not None:
            from lowbit.gguf.plan import dequantized

            imp = None if importance is None else importance.float().numpy()
            return torch.from_numpy(dequantized(self.gguf_type, w.contiguous().numpy(), imp)).reshape(w.shape)
        if self.spec is None:
            dtype = {16: torch.float16, 32: torch.float32}[self.float_bits]
            return w.to(dtype).float()
        from lowbit.formats.quantize import dequantize
        from lowbit.methods.rtn import rtn

        return dequantize(rtn(w, self.spec)).float()


def _gguf_block(type_name: str) -> tuple[int, int]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    except KeyError:
        raise LowbitError(f"unknown GGUF type {type_name!r}; candidates are "
                          f"{', '.join(GGUF_CANDIDATES + GGUF_OPTIONAL)}") from None


def parse_candidate(text: str, gguf: bool = False, float_dtype: str = "fp16") -> Candidate:
    """``keep``, a spec string, or (with ``gguf``) a GGUF block type name."""
    text = text.strip()
    if gguf:
        name = text.upper()
        if name not in GGUF_CANDIDATES + GGUF_OPTIONAL:
            raise LowbitError(f"GGUF candidate {text!r} is not one of {', '.join(GGUF_CANDIDATES + GGUF_OPTIONAL)}")
        return Candidate(name, gguf_type=name)
    if text.lower() in (KEEP, "float", "fp16", "bf16"):
        return Candidate(KEEP, float_bits=FLOAT_BITS[float_dtype])
    spec = parse_spec(text)
    return Candidate(str(spec), spec=spec)


DEFAULT_GROUPS = (128, 64, 32)


def default_candidates(group_size: int | None, symmetric: bool | None, gguf: bool) -> tuple[str, ...]:
    """int2..int6 in groups of 128, 64 and 32 (or only the user's --group-size), asymmetric unless --sym, plus
    int8 per channel and keep; or, for GGUF, the legacy, k-quant and IQ4 types and F16. Group sizes are choices too:
    a 3-bit layer in groups of 64 can beat a mix of 3 and 4 bits in groups of 128 at the same size."""
    if gguf:
        return GGUF_CANDIDATES
    groups = (group_size,) if group_size else DEFAULT_GROUPS
    sym = "" if symmetric else ":asym"
    return (*(f"int{b}:g{g}{sym}" for b in (2, 3, 4, 5, 6) for g in groups), "int8:channel", KEEP)


def probe_candidate(candidates: tuple[Candidate, ...]) -> Candidate:
    """The candidate whose end-to-end KLD is measured per module: the one nearest 3 bits per weight (where
    budgeted mixes make their choices; lower widths are far from the quadratic regime the proxies model)."""
    if any(c.gguf_type == GGUF_PROBE for c in candidates):
        return next(c for c in candidates if c.gguf_type == GGUF_PROBE)
    quantized = [c for c in candidates if c.spec is not None or c.is_gguf]
    if not quantized:
        raise LowbitError("the candidate set has no quantized precision to measure")
    return min(quantized, key=lambda c: (abs(c.bits_per_weight() - 3.2), c.bits_per_weight()))


def _holds_everything(spec: QuantSpec) -> bool:
    return True


def _ct_holds(spec: QuantSpec) -> bool:
    from lowbit.export.ct_formats import FORMATS

    return any(f.holds(spec) for f in FORMATS)


def _gptq_holds(spec: QuantSpec) -> bool:
    from lowbit.export.gptq import holds

    return holds(spec)


def _awq_holds(spec: QuantSpec) -> bool:
    from lowbit.export.awq import holds

    return holds(spec)


def _onnx_holds(spec: QuantSpec) -> bool:
    from lowbit.formats.integer import IntegerFormat
    from lowbit.formats.registry import get_format

    return isinstance(get_format(spec.format), IntegerFormat) and spec.granularity != "block" and \
        spec.scale_dtype in ("fp16", "bf16", "fp32")


# What each output format can store (``keep`` always can): checked before any work starts.
HOLDS: dict[str, Callable[[QuantSpec], bool]] = {
    "lowbit": _holds_everything, "hf": _ct_holds, "gptq": _gptq_holds, "awq": _awq_holds, "onnx": _onnx_holds,
}


def candidates_for(texts: tuple[str, ...], formats: tuple[str, ...], float_dtype: str = "fp16",
                   explicit: bool = True) -> tuple[Candidate, ...]:
    """Parse candidate strings for the output ``formats``. A candidate a format cannot hold is an error when
    the user named it (``explicit``) and silently dropped from a default set."""
    gguf = "gguf" in formats
    if gguf and len(formats) > 1:
        raise LowbitError("a budgeted allocation writes either GGUF or lowbit-family formats; run them separately")
    out = []
    for text in texts:
        cand = parse_candidate(text, gguf=gguf, float_dtype=float_dtype)
        bad = [f for f in formats if cand.spec is not None and not HOLDS[f](cand.spec)]
        if bad and explicit:
            raise LowbitError(f"candidate {cand.name} cannot be written as {', '.join(bad)}; drop it from --candidates")
        if not bad and cand.name not in {c.name for c in out}:
            out.append(cand)
    if not out:
        raise LowbitError("no candidate precision is left for this output format")
    return tuple(out)


def describe_bits(bits: float, weights: int) -> str:
    return f"{bits / max(weights, 1):.3f} bpw ({math.ceil(bits / 8) / 1e6:.2f} MB)"
