"""How per-block scales are stored: 16/32-bit floats, FP8 E4M3 under a per-tensor FP32 global scale, or E8M0.

- ``fp16`` / ``bf16`` / ``fp32``: scale = amax / (the format's largest code magnitude), cast to the dtype.
- ``e4m3`` (NVFP4's rule, as compressed-tensors writes it): a per-tensor FP32 ``global = 448 * qmax / amax(w)``
  stretches the block scales over E4M3's range; each block stores ``e4m3((block_amax / qmax) * global)``
  and an element is ``code_value * block_scale / global``. Always comes with a global scale.
- ``e8m0`` (OCP Microscaling): a power of two with no mantissa, ``2^(floor(log2(block_amax)) - emax)`` where
  ``emax = floor(log2(qmax))`` is the element format's largest exponent (2 for E2M1, 8 for E4M3). The
  exponent is read exactly with frexp; elements above qmax saturate, as the MX spec says.
"""

from __future__ import annotations

import math

import torch

SCALE_TORCH_DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "e4m3": torch.float8_e4m3fn,
    "e8m0": torch.float8_e8m0fnu,
}
FLOAT_SCALE_DTYPES = ("fp16", "bf16", "fp32")
E4M3_MAX = 448.0
E4M3_MIN = 2.0**-9  # smallest positive (subnormal) E4M3 value: all-zero blocks get it instead of 0
E8M0_BIAS = 127


def has_global_scale(scale_dtype: str) -> bool:
    """Whether scales of this dtype come with a per-tensor FP32 global scale (only ``e4m3``)."""
    return scale_dtype == "e4m3"


def global_scale(amax: torch.Tensor, qmax: float, scale_dtype: str) -> torch.Tensor | None:
    """The per-tensor FP32 scale, shape (1,), for a tensor whose largest |value| is ``amax`` (None if unused)."""
    if not has_global_scale(scale_dtype):
        return None
    amax = amax.reshape(1).to(torch.float32)
    return torch.where(amax > 0, (E4M3_MAX * qmax) / amax, torch.ones_like(amax))


def block_scales(
    amax: torch.Tensor, qmax: float, scale_dtype: str, global_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Stored scales (in ``scale_dtype``) for blocks whose largest |value| is ``amax`` (float32)."""
    dtype = SCALE_TORCH_DTYPES[scale_dtype]
    if scale_dtype == "e8m0":
        return e8m0_from_amax(amax, qmax)
    if scale_dtype == "e4m3":
        if global_scale is None:
            raise ValueError("e4m3 block scales need the per-tensor global scale")
        return ((amax / qmax) * global_scale).clamp(E4M3_MIN, E4M3_MAX).to(dtype)
    return (amax / qmax).clamp_min(torch.finfo(dtype).tiny).to(dtype)


def e8m0_from_amax(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """OCP MX shared scale: biased exponent floor(log2(amax)) - emax + 127 (0 for all-zero blocks), as E8M0."""
    emax = math.floor(math.log2(qmax))
    _, exp = torch.frexp(amax.to(torch.float32))  # amax = m * 2^exp with m in [0.5, 1): floor(log2) = exp - 1
    biased = torch.where(amax > 0, exp.to(torch.int32) - 1 - emax + E8M0_BIAS, torch.zeros_like(exp, dtype=torch.int32))
    return biased.clamp(0, 254).to(torch.uint8).view(torch.float8_e8m0fnu)


def scale_values(scales: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 step each block's codes are multiplied by: the stored scale, divided by the global one."""
    values = scales.to(torch.float32)
    if global_scale is not None:
        values = values / global_scale.to(torch.float32)
    return values


def select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.where for scale tensors of any storage dtype (8-bit floats are chosen through their bytes)."""
    if a.element_size() == 1 and a.is_floating_point():
        return torch.where(mask, a.view(torch.uint8), b.view(torch.uint8)).view(a.dtype)
    return torch.where(mask, a, b)
