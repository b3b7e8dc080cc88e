"""Model-level presets named as people say them (W8A16, W4A16, ...): a weight spec plus a float dtype.

A scheme is plain data. ``weights`` is a spec string (None: only cast to 16-bit floats); every tensor a
rule keeps in high precision is stored in ``float_dtype``; ``activations`` (an activation spec string,
or None for weight-only schemes) says how the quantized linears' inputs are quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.formats.spec import QuantSpec, parse_spec


@dataclass(frozen=True)
class Scheme:
    """A named preset: which spec the targeted weights get, and the dtype everything else is stored in."""

    name: str
    weights: str | None
    float_dtype: str
    description: str
    activations: str | None = None


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("W16A16", None, "fp16", "every weight cast to fp16 (use --dtype bf16 for bf16)"),
        Scheme("FP16", None, "fp16", "every weight cast to fp16"),
        Scheme("BF16", None, "bf16", "every weight cast to bf16"),
        Scheme("W8A16", "int8:channel", "fp16", "int8 weights, one scale per output channel"),
        Scheme("W4A16", "int4:g128", "fp16", "int4 weights in groups of 128 along the input"),
        Scheme("W3A16", "int3:g128", "fp16", "int3 weights in groups of 128 along the input"),
        Scheme("W2A16", "int2:g64", "fp16", "int2 weights in groups of 64 along the input"),
        Scheme("W8A8", "int8:channel", "fp16", "int8 weights per channel, int8 activations per token (dynamic)",
               "int8:token:dynamic"),
        Scheme("W4A8", "int4:g128", "fp16", "int4 weights in groups of 128, int8 activations per token (dynamic)",
               "int8:token:dynamic"),
        Scheme("FP8-dynamic", "fp8_e4m3:channel", "fp16",
               "FP8 E4M3 weights per channel, FP8 E4M3 activations per token (dynamic)", "fp8_e4m3:token:dynamic"),
        Scheme("FP8", "fp8_e4m3:channel", "fp16", "FP8 E4M3 weights, one fp32 scale per output channel"),
        Scheme("FP8_E5M2", "fp8_e5m2:channel", "fp16", "FP8 E5M2 weights, one fp32 scale per output channel"),
        Scheme("NVFP4", "nvfp4", "fp16", "FP4 E2M1 in blocks of 16, E4M3 block scales, fp32 tensor scale"),
        Scheme("MXFP4", "mxfp4", "fp16", "OCP MXFP4: FP4 E2M1 in blocks of 32, E8M0 power-of-two scales"),
        Scheme("MXFP8", "mxfp8", "fp16", "OCP MXFP8: FP8 E4M3 in blocks of 32, E8M0 power-of-two scales"),
        Scheme("FP4", "fp4_e2m1:g32", "fp16", "FP4 E2M1 in groups of 32 with fp16 scales"),
        Scheme("NF4", "nf4:g64", "fp16", "NormalFloat4 (bitsandbytes levels), absmax in groups of 64"),
        Scheme("NF4-DQ", "nf4:g64:scale=e4m3", "fp16",
               "NF4 with double-quantized absmax: 8-bit E4M3 block scales under one fp32 tensor scale"),
        Scheme("LOG2", "log2_4:g32", "fp16", "4-bit powers of two (sign + 2^-6..2^0, zero) in groups of 32"),
        Scheme("TERNARY", "ternary:g64", "fp16", "{-1, 0, +1} x TWN scale in groups of 64"),
        Scheme("BINARY", "binary:g64", "fp16", "{-1, +1} x mean|w| in groups of 64"),
    )
}

FLOAT_DTYPES = ("fp16", "bf16", "fp32")


def get_scheme(name: str) -> Scheme:
    """The scheme called ``name`` (case-insensitive), or a one-line error listing the known ones."""
    for key, scheme in SCHEMES.items():
        if key.lower() == name.lower():
            return scheme
    raise LowbitError(f"unknown scheme {name!r}; known schemes: {', '.join(SCHEMES)}")


def weight_spec(
    scheme: Scheme,
    group_size: int | None = None,
    symmetric: bool | None = None,
    scale_search: str | None = None,
) -> QuantSpec | None:
    """The scheme's weight spec with the user's overrides applied (None for float-only schemes)."""
    if scheme.weights is None:
        return None
    spec = parse_spec(scheme.weights)
    changes: dict[str, object] = {}
    if group_size is not None:
        if group_size <= 0:
            raise LowbitError(f"--group-size must be a positive integer, got {group_size}")
        changes.update(granularity="group", group_size=group_size)
    if symmetric is not None:
        changes["symmetric"] = symmetric
    if scale_search is not None:
        changes["scale_search"] = scale_search
    return spec.with_options(**changes) if changes else spec
