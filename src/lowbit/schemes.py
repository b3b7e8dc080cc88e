"""Model-level presets named as people say them (W8A16, W4A16, ...): a weight spec plus a float dtype.

A scheme is plain data. ``weights`` is a spec string (None: only cast to 16-bit floats); every tensor a
rule keeps in high precision is stored in ``float_dtype``.
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
