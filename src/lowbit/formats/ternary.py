"""Ternary {-1, 0, +1}·scale and binary {-1, +1}·scale weights, with their own scale rules.

These formats pick scales from the whole block, not from its maximum, through the ``block_params`` hook
(formats without it get min/max scales):
- ``ternary`` (TWN, Li et al. 2016): threshold d = 0.7 * mean|w| over the block, scale = mean of |w| over the
  elements with |w| > d. Codes are then the nearest of {-1, 0, +1} for that scale (threshold scale/2), the
  same rule any fixed-scale method uses; for a given scale it never has more error than TWN's threshold d.
  2-bit signed codes.
- ``binary`` (XNOR-Net): scale = mean|w| over the block, code 1 for w >= 0 (+scale) and 0 for w < 0 (-scale).
  1-bit unsigned codes.
Padding of ragged edge blocks is masked out of every mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lowbit.formats.registry import register_format
from lowbit.formats.scales import block_scales

if TYPE_CHECKING:
    from lowbit.formats.spec import QuantSpec

TWN_THRESHOLD = 0.7


def _masked_abs(b: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = mask.to(b.dtype)
    return b.abs() * m, m.sum(-1)


@dataclass(frozen=True)
class TernaryFormat:
    """Codes -1, 0, +1 (signed, 2 bits); TWN scale rule."""

    name: str = "ternary"
    bits: int = 2
    supports_asymmetric: bool = False
    codes_signed: bool = True

    def max_code_magnitude(self, symmetric: bool) -> float:
        return 1.0

    def zero_range(self) -> tuple[int, int]:
        return 0, 0

    def block_params(self, b: torch.Tensor, mask: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, None]:
        """TWN scales for blocks ``b`` (n_r, n_c, elements); ``mask`` marks real elements."""
        a, count = _masked_abs(b, mask)
        delta = TWN_THRESHOLD * a.sum(-1) / count
        keep = (a > delta[..., None]).to(b.dtype)
        alpha = (a * keep).sum(-1) / keep.sum(-1).clamp_min(1)
        return block_scales(alpha, 1.0, spec.scale_dtype), None

    def encode(self, x: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        return torch.round(x).clamp_(-1, 1).to(torch.int16)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.float32)


@dataclass(frozen=True)
class BinaryFormat:
    """Codes 0 (-1) and 1 (+1), 1 bit; scale = mean|w| of the block."""

    name: str = "binary"
    bits: int = 1
    supports_asymmetric: bool = False
    codes_signed: bool = False

    def max_code_magnitude(self, symmetric: bool) -> float:
        return 1.0

    def zero_range(self) -> tuple[int, int]:
        return 0, 0

    def block_params(self, b: torch.Tensor, mask: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, None]:
        """Mean |w| of each block's real elements."""
        a, count = _masked_abs(b, mask)
        return block_scales(a.sum(-1) / count, 1.0, spec.scale_dtype), None

    def encode(self, x: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        return (x >= 0).to(torch.int16)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.float32) * 2 - 1


register_format(TernaryFormat())
register_format(BinaryFormat())
