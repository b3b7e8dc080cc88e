"""Sizes of what was written: bytes on disk and bits per quantized weight, counting scales and zeros."""

from __future__ import annotations

import math
from pathlib import Path

from lowbit.model.checkpoint import read_header

DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "U8": 8, "I8": 8,
              "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "BOOL": 8}


def quantized_bits_per_weight(weights_file: Path) -> float | None:
    """Stored bits per element of the quantized weights (codes + scales + zeros + global scales), from the header.

    None when the checkpoint holds no quantized tensor (a plain 16-bit cast).
    """
    header, meta = read_header(weights_file)
    entries = meta.get("quantized", {})
    if not entries:
        return None
    numel = sum(math.prod(e["shape"]) for e in entries.values())
    nbytes = 0
    for name in entries:
        for part in ("qcodes", "scales", "qzeros", "global_scale"):
            info = header.get(f"{name}.{part}")
            if info:
                nbytes += info["data_offsets"][1] - info["data_offsets"][0]
    return 8 * nbytes / numel


def float_bits(dtype_name: str) -> int:
    """Bits of one element of a safetensors dtype name."""
    return DTYPE_BITS.get(dtype_name, 0)
