"""The one registry of number formats: a name such as ``int4`` maps to the object that knows its grid."""

from __future__ import annotations

from typing import Protocol

import torch

from lowbit.errors import LowbitError


class NumberFormat(Protocol):
    """A grid of representable values, in units of one scale step; pure tensor math, no model walking.

    ``codes_signed``: whether symmetric codes are signed integers (stored with an offset of 2^(bits-1)) or
    already unsigned bit patterns (float formats, table indices). Optional hooks, looked up by name:
    ``block_params(blocks, mask, spec) -> (scales, zeros)`` for formats whose scale is not max-based
    (ternary, binary); ``spec_defaults`` (spec fields a bare format name implies) and ``fixed_fields``
    (fields a spec of this format must have, e.g. NVFP4's blocks of 16); ``exact_blocks`` (rows must be a
    whole number of groups).
    """

    name: str
    bits: int
    supports_asymmetric: bool
    codes_signed: bool

    def max_code_magnitude(self, symmetric: bool) -> float:
        """What a block's largest |value| (symmetric) or value range (asymmetric) maps to, in scale units."""
        ...

    def encode(self, x: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """Round values already divided by their scale onto the grid; returns integer codes."""
        ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Grid values (float32, in scale units, before the zero point is removed) of the codes."""
        ...

    def zero_range(self) -> tuple[int, int]:
        """Allowed zero points for the asymmetric form (code values)."""
        ...


_FORMATS: dict[str, NumberFormat] = {}


def register_format(fmt: NumberFormat) -> NumberFormat:
    """Add a format under its name; a second format with the same name is a bug."""
    if fmt.name in _FORMATS:
        raise ValueError(f"format {fmt.name} registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> NumberFormat:
    """The format called ``name``, or a one-line error listing the known ones."""
    try:
        return _FORMATS[name]
    except KeyError:
        raise LowbitError(f"unknown number format {name!r}; known formats: {', '.join(format_names())}") from None


def format_names() -> list[str]:
    """Names of every registered format, in registration order."""
    return list(_FORMATS)


# Formats register themselves on import; importing them here keeps one place that lists them all.
from lowbit.formats import integer as _integer  # noqa: E402,F401
from lowbit.formats import floating as _floating  # noqa: E402,F401
from lowbit.formats import lut as _lut  # noqa: E402,F401
from lowbit.formats import microscaling as _microscaling  # noqa: E402,F401
from lowbit.formats import ternary as _ternary  # noqa: E402,F401
