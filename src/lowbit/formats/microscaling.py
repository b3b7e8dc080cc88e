"""Block-scaled float formats named as the field names them: NVFP4, MXFP4, MXFP8.

Each is an element grid plus a fixed block size and scale storage (the scale rules live in scales.py):
- ``nvfp4``: FP4 E2M1 elements (ties to even), blocks of 16, E4M3 block scales under a per-tensor FP32
  global scale (global = 448*6/amax, w = fp4 * scale / global), 4.5 bits per weight.
- ``mxfp4``: FP4 E2M1 elements, blocks of 32, E8M0 shared scale 2^(floor(log2(amax)) - 2), 4.25 bits per
  weight. Element ties go toward zero, as llama.cpp/gguf's MXFP4 quantizer (its first minimum in
  kvalues order), so our blocks are byte-identical to gguf.quants.MXFP4.
- ``mxfp8``: FP8 E4M3 elements, blocks of 32, E8M0 scale 2^(floor(log2(amax)) - 8), 8.25 bits per weight.

Rows must be a whole number of blocks: these formats have no ragged edge block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.floating import FP4_E2M1, FP8_E4M3, Fp4Format
from lowbit.formats.registry import NumberFormat, register_format


@dataclass(frozen=True)
class BlockScaledFormat:
    """An element format with the block size and scale dtype fixed, as one named format."""

    name: str
    element: NumberFormat
    group_size: int
    scale_dtype: str
    supports_asymmetric: bool = False
    exact_blocks: bool = True

    @property
    def bits(self) -> int:
        return self.element.bits

    @property
    def codes_signed(self) -> bool:
        return self.element.codes_signed

    @property
    def fixed_fields(self) -> dict[str, object]:
        """Spec fields this format always has (a spec that differs is refused)."""
        return {"granularity": "group", "group_size": self.group_size, "scale_dtype": self.scale_dtype}

    @property
    def spec_defaults(self) -> dict[str, object]:
        return self.fixed_fields

    def max_code_magnitude(self, symmetric: bool) -> float:
        return self.element.max_code_magnitude(symmetric)

    def zero_range(self) -> tuple[int, int]:
        return self.element.zero_range()

    def encode(self, x: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        return self.element.encode(x, zero)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.element.decode(codes)


NVFP4 = register_format(BlockScaledFormat("nvfp4", FP4_E2M1, 16, "e4m3"))
MXFP4 = register_format(BlockScaledFormat("mxfp4", Fp4Format(name="e2m1_ties_down", ties="down"), 32, "e8m0"))
MXFP8 = register_format(BlockScaledFormat("mxfp8", FP8_E4M3, 32, "e8m0"))
