"""Floating-point element grids: FP8 E4M3 / E5M2 and FP4 E2M1, each used under a per-block scale.

- ``fp8_e4m3``: OCP E4M3 as torch.float8_e4m3fn (no infinities, max 448); ``fp8_e5m2``: torch.float8_e5m2
  (max 57344). Codes are the 8-bit patterns (unsigned, in int16). Rounding is torch's cast (nearest, ties to
  even) after clamping to ±max, i.e. saturating. Scales default to fp32 (an fp16 scale of amax/57344 would
  be subnormal for typical weights).
- ``fp4_e2m1``: {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}; code = sign bit 3 + index into
  [0, .5, 1, 1.5, 2, 3, 4, 6] (the nibble compressed-tensors and GGUF use); nearest, saturating at 6, ties
  to the even index (IEEE round-half-even, as compressed-tensors' NVFP4). MXFP4 uses ties toward zero to
  match llama.cpp/gguf (see microscaling.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.lut import decode_sign_magnitude, encode_sign_magnitude
from lowbit.formats.registry import register_format

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class Fp8Format:
    """An 8-bit float grid backed by a torch float8 dtype; codes are its bit patterns."""

    name: str
    dtype: torch.dtype
    max_value: float
    bits: int = 8
    supports_asymmetric: bool = False
    codes_signed: bool = False

    @property
    def spec_defaults(self) -> dict[str, object]:
        return {"scale_dtype": "fp32"}

    def max_code_magnitude(self, symmetric: bool) -> float:
        return self.max_value

    def zero_range(self) -> tuple[int, int]:
        return 0, 0

    def encode(self, x: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        q = x.to(torch.float32).clamp(-self.max_value, self.max_value).to(self.dtype)
        return q.view(torch.uint8).to(torch.int16)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.uint8).view(self.dtype).to(torch.float32)


@dataclass(frozen=True)
class Fp4Format:
    """FP4 E2M1 in sign-magnitude codes; ``ties`` is ``even`` (IEEE) or ``down`` (toward zero, llama.cpp)."""

    name: str = "fp4_e2m1"
    ties: str = "even"
    bits: int = 4
    supports_asymmetric: bool = False
    codes_signed: bool = False

    @property
    def magnitudes(self) -> torch.Tensor:
        return torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32)

    def max_code_magnitude(self, symmetric: bool) -> float:
        return 6.0

    def zero_range(self) -> tuple[int, int]:
        return 0, 0

    def encode(self, x: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        return encode_sign_magnitude(x, self.magnitudes, self.ties)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return decode_sign_magnitude(codes, self.magnitudes)


FP8_E4M3 = register_format(Fp8Format("fp8_e4m3", torch.float8_e4m3fn, 448.0))
FP8_E5M2 = register_format(Fp8Format("fp8_e5m2", torch.float8_e5m2, 57344.0))
FP4_E2M1 = register_format(Fp4Format())
