"""Formats defined by a table of levels: rounding onto a sorted table, sign-magnitude codes, NF4 and log2.

``round_to_levels`` is the one rounding rule behind every table format (and FP4 E2M1): nearest level,
values beyond the ends saturate, and exact ties go ``down`` (to the lower level), ``up`` or to the
``even`` table index (IEEE round-half-even when the table is a float format's magnitudes).

- ``nf4``: bitsandbytes' 16 NormalFloat levels in [-1, 1] with an exact zero; code = table index; a block's
  absolute maximum maps to 1. Ties go down (bitsandbytes compares ``x > midpoint``).
- ``log2_<b>`` (b = 3..8): sign bit b-1 and 2^(b-1) magnitudes {0, 2^-(n-2), ..., 1/2, 1}; ties toward zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.registry import register_format

# bitsandbytes' NF4 table (quantiles of N(0, 1) normalized to [-1, 1], with an exact zero).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230611801147, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def round_to_levels(x: torch.Tensor, levels: torch.Tensor, ties: str = "down") -> torch.Tensor:
    """Index (int64) of the nearest entry of the sorted float32 ``levels`` for each element of ``x``."""
    levels = levels.to(x.device)
    mids = (levels[:-1] + levels[1:]) / 2
    idx = torch.bucketize(x, mids)  # x == mids[i] lands on i: the lower level
    if ties == "down":
        return idx
    on_mid = x == mids[idx.clamp(max=mids.numel() - 1)]
    on_mid &= idx < mids.numel()
    if ties == "up":
        return torch.where(on_mid, idx + 1, idx)
    if ties == "even":
        return torch.where(on_mid & (idx % 2 == 1), idx + 1, idx)
    raise ValueError(f"unknown tie rule {ties!r}")


def encode_sign_magnitude(x: torch.Tensor, magnitudes: torch.Tensor, ties: str) -> torch.Tensor:
    """Codes = sign bit (value len(magnitudes)) | index of the nearest magnitude; zero is never negative."""
    idx = round_to_levels(x.abs(), magnitudes, ties)
    sign = ((x < 0) & (idx > 0)).to(torch.int64) * magnitudes.numel()
    return (idx | sign).to(torch.int16)


def decode_sign_magnitude(codes: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """Float32 values of sign-magnitude codes."""
    n = magnitudes.numel()
    c = codes.to(torch.int64)
    values = magnitudes.to(codes.device)[c % n]
    return torch.where(c >= n, -values, values)


@dataclass(frozen=True)
class NF4Format:
    """NormalFloat4: 16 levels in [-1, 1] from bitsandbytes; absmax scaling, codes are table indices."""

    name: str = "nf4"
    bits: int = 4
    supports_asymmetric: bool = False
    codes_signed: bool = False

    @property
    def levels(self) -> torch.Tensor:
        return torch.tensor(NF4_LEVELS, dtype=torch.float32)

    def max_code_magnitude(self, symmetric: bool) -> float:
        return 1.0

    def zero_range(self) -> tuple[int, int]:
        return 0, 0

    def encode(self, x: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        return round_to_levels(x, self.levels, "down").to(torch.int16)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.levels.to(codes.device)[codes.to(torch.int64)]


@dataclass(frozen=True)
class Log2Format:
    """Powers of two: zero and ±2^-(n-2) .. ±1 (n = 2^(bits-1)); a block's |max| maps to 1."""

    bits: int
    supports_asymmetric: bool = False
    codes_signed: bool = False

    @property
    def name(self) -> str:
        return f"log2_{self.bits}"

    @property
    def magnitudes(self) -> torch.Tensor:
        n = 2 ** (self.bits - 1)
        powers = [2.0 ** (j - (n - 1)) for j in range(1, n)]
        return torch.tensor([0.0, *powers], dtype=torch.float32)

    def max_code_magnitude(self, symmetric: bool) -> float:
        return 1.0

    def zero_range(self) -> tuple[int, int]:
        return 0, 0

    def encode(self, x: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        return encode_sign_magnitude(x, self.magnitudes, "down")

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return decode_sign_magnitude(codes, self.magnitudes)


register_format(NF4Format())
for _bits in range(3, 9):
    register_format(Log2Format(_bits))
