"""What the machine can do that changes how lowbit computes (native bf16 matrix units)."""

from __future__ import annotations

import torch


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (oneDNN says so: AVX512-BF16 or AMX); without them
    bf16 autocast is several times slower than fp32 (measured 8x on an AVX2-only EPYC)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
