"""QuantSpec: how one tensor is quantized, as a frozen value with a short string form.

A spec string is a format name followed by colon-separated options, e.g. ``int4:g128:asym``,
``int8:channel``, ``int3:g128:asym:mse``, ``int4:b64x64``, ``int8:tensor:scale=fp32``.
Options: ``tensor`` | ``channel`` | ``g<N>`` (groups of N along the input dimension; a row's last group
may be shorter) | ``b<R>x<C>`` (2-D blocks); ``sym`` | ``asym``; ``minmax`` | ``mse`` (scale search);
``scale=fp16|bf16|fp32|e4m3|e8m0`` (how scales are stored; ``e4m3`` adds a per-tensor FP32 global scale,
``e8m0`` is a power of two: see scales.py). Named block formats need no options: ``nvfp4``, ``mxfp4``,
``mxfp8`` imply their block size and scale dtype, and ``fp8_e4m3`` implies fp32 scales.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from lowbit.errors import LowbitError
from lowbit.formats.registry import get_format

GRANULARITIES = ("tensor", "channel", "group", "block")
SCALE_DTYPES = ("fp16", "bf16", "fp32", "e4m3", "e8m0")
SCALE_SEARCHES = ("minmax", "mse")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: number format, granularity, symmetry, scale storage and search."""

    format: str
    granularity: str = "channel"
    group_size: int = 0
    block_shape: tuple[int, int] = (0, 0)
    symmetric: bool = True
    scale_dtype: str = "fp16"
    scale_search: str = "minmax"

    def __post_init__(self) -> None:
        fmt = get_format(self.format)
        if self.granularity not in GRANULARITIES:
            raise LowbitError(f"unknown granularity {self.granularity!r}; use one of {', '.join(GRANULARITIES)}")
        if self.granularity == "group" and self.group_size <= 0:
            raise LowbitError(f"group size must be a positive integer, got {self.group_size}")
        if self.granularity == "block" and min(self.block_shape) <= 0:
            raise LowbitError(f"block shape must be two positive integers, got {self.block_shape}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise LowbitError(f"unknown scale dtype {self.scale_dtype!r}; use one of {', '.join(SCALE_DTYPES)}")
        if self.scale_search not in SCALE_SEARCHES:
            raise LowbitError(f"unknown scale search {self.scale_search!r}; use one of {', '.join(SCALE_SEARCHES)}")
        if not self.symmetric and not fmt.supports_asymmetric:
            raise LowbitError(f"format {self.format} has no asymmetric (zero-point) form; drop 'asym'")
        if not self.symmetric and self.scale_dtype in ("e4m3", "e8m0"):
            raise LowbitError(f"scale={self.scale_dtype} is for symmetric specs only; drop 'asym' or use scale=fp16")
        self._check_format_rules(fmt)

    def _check_format_rules(self, fmt: object) -> None:
        fixed = getattr(fmt, "fixed_fields", {})
        if any(getattr(self, key) != value for key, value in fixed.items()):
            raise LowbitError(
                f"{self.format} always uses groups of {fixed['group_size']} with {fixed['scale_dtype']} scales; "
                f"write just '{self.format}', or use its element format with options (e.g. 'fp4_e2m1:g32')"
            )
        if getattr(fmt, "block_params", None) is not None:
            if self.scale_search != "minmax":
                raise LowbitError(f"format {self.format} chooses its own scales; drop '{self.scale_search}'")
            if self.scale_dtype in ("e4m3", "e8m0"):
                raise LowbitError(f"format {self.format} needs fp16, bf16 or fp32 scales, not {self.scale_dtype}")

    @property
    def codes_signed(self) -> bool:
        """Whether stored codes are signed integers (packed with an offset of 2^(bits-1))."""
        return self.symmetric and get_format(self.format).codes_signed

    def check_shape(self, rows: int, cols: int, name: str = "tensor") -> None:
        """Refuse shapes a block format cannot hold (NVFP4/MX rows must be whole blocks) with a one-line error."""
        fmt = get_format(self.format)
        if getattr(fmt, "exact_blocks", False) and cols % self.group_size:
            raise LowbitError(
                f"{name}: {self.format} needs rows of a multiple of {self.group_size} values, got {cols}; "
                f"keep it in float (--ignore) or use e.g. 'fp4_e2m1:g{self.group_size}'"
            )

    @property
    def bits(self) -> int:
        """Bits per stored code."""
        return get_format(self.format).bits

    def block_size(self, rows: int, cols: int) -> tuple[int, int]:
        """The (rows, cols) extent of one scale block for a 2-D tensor of this shape."""
        if self.granularity == "tensor":
            return rows, cols
        if self.granularity == "channel":
            return 1, cols
        if self.granularity == "group":
            return 1, self.group_size
        return self.block_shape

    def with_options(self, **changes: object) -> "QuantSpec":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def __str__(self) -> str:
        if getattr(get_format(self.format), "fixed_fields", None):
            return self.format if self.scale_search == "minmax" else f"{self.format}:{self.scale_search}"
        parts = [self.format]
        if self.granularity == "group":
            parts.append(f"g{self.group_size}")
        elif self.granularity == "block":
            parts.append(f"b{self.block_shape[0]}x{self.block_shape[1]}")
        else:
            parts.append(self.granularity)
        if not self.symmetric:
            parts.append("asym")
        if self.scale_search != "minmax":
            parts.append(self.scale_search)
        if self.scale_dtype != getattr(get_format(self.format), "spec_defaults", {}).get("scale_dtype", "fp16"):
            parts.append(f"scale={self.scale_dtype}")
        return ":".join(parts)


_GROUP = re.compile(r"g(?:roup)?[:=]?(-?\d+)$")
_BLOCK = re.compile(r"b(?:lock)?[:=]?(-?\d+)x(-?\d+)$")


def parse_spec(text: str) -> QuantSpec:
    """Parse a spec string such as ``int4:g128:asym`` into a QuantSpec; raise LowbitError if it is bad."""
    tokens = [t.strip().lower() for t in text.split(":") if t.strip()]
    if not tokens:
        raise LowbitError("empty quantization spec; write e.g. 'int4:g128:asym'")
    fields: dict[str, object] = {"format": tokens[0], **getattr(get_format(tokens[0]), "spec_defaults", {})}
    for token in tokens[1:]:
        fields.update(_parse_option(token, text))
    return QuantSpec(**fields)  # type: ignore[arg-type]


def _parse_option(token: str, text: str) -> dict[str, object]:
    if token in ("tensor", "channel"):
        return {"granularity": token}
    if token in ("sym", "asym"):
        return {"symmetric": token == "sym"}
    if token in SCALE_SEARCHES:
        return {"scale_search": token}
    if token.startswith("scale="):
        return {"scale_dtype": token.split("=", 1)[1]}
    if m := _GROUP.match(token):
        return {"granularity": "group", "group_size": int(m.group(1))}
    if m := _BLOCK.match(token):
        return {"granularity": "block", "block_shape": (int(m.group(1)), int(m.group(2)))}
    raise LowbitError(
        f"unknown option {token!r} in spec {text!r}; options are tensor, channel, g<N>, b<R>x<C>, "
        "sym, asym, minmax, mse, scale=fp16|bf16|fp32|e4m3|e8m0"
    )
