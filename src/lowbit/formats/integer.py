"""Integer grids of 2..8 bits: signed codes around zero (symmetric) or unsigned codes with a zero point.

Symmetric scales follow GPTQ and compressed-tensors: a block's absolute maximum maps to (2^b - 1) / 2
(7.5 for 4 bits), so codes use the full signed range [-2^(b-1), 2^(b-1) - 1] and exporters stay bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.registry import register_format


@dataclass(frozen=True)
class IntegerFormat:
    """b-bit integers; codes are int16 tensors holding either signed or unsigned values."""

    bits: int
    supports_asymmetric: bool = True
    codes_signed: bool = True

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def max_code_magnitude(self, symmetric: bool) -> float:
        return self.levels / 2 if symmetric else float(self.levels)

    def signed_range(self) -> tuple[int, int]:
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    def zero_range(self) -> tuple[int, int]:
        return 0, self.levels

    def encode(self, x: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        q = torch.round(x)
        if zero is None:
            lo, hi = self.signed_range()
        else:
            q = q + zero
            lo, hi = self.zero_range()
        return q.clamp_(lo, hi).to(torch.int16)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.float32)

    def round_trip(self, x: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """``decode(encode(x, zero)) - zero`` computed in place on float ``x`` (the same integers, no int16 copy):
        the inner loop of the MSE scale search."""
        if zero is None:
            return x.round_().clamp_(*self.signed_range())
        return x.round_().add_(zero).clamp_(*self.zero_range()).sub_(zero)


for _bits in range(2, 9):
    register_format(IntegerFormat(_bits))
