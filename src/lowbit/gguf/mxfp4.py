"""MXFP4 blocks: 32 E2M1 values sharing one E8M0 power-of-two scale (17 bytes).

value = KVALUES[nibble] * 2^(e - 128) with KVALUES the doubled E2M1 levels. Reference (no weights):
e = floor(log2(absmax)) - 2 + 127 and each value takes the nearest level (first on ties), as ggml's
``quantize_row_mxfp4_ref``. With weights, the exponents e-1, e, e+1 are tried and the lowest weighted error wins.
"""

from __future__ import annotations

import numpy as np

from lowbit.gguf.blocks import BlockType
from lowbit.gguf.grid import F32
from lowbit.gguf.legacy import pack_nibbles

KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=F32)


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """ggml's GGML_E8M0_TO_FP32_HALF: 2^(e - 128) as float32 (denormal for e < 2)."""
    return np.ldexp(F32(1), e.astype(np.int32) - 128).astype(F32)


def _nearest_levels(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    err = np.abs(KVALUES * d[:, None, None] - x[:, :, None])
    return err.argmin(-1).astype(np.uint8)


class MXFP4(BlockType):
    name = "MXFP4"

    @classmethod
    def quantize_blocks(cls, x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        amax = np.abs(x).max(-1)
        with np.errstate(divide="ignore"):
            e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2 + 127, 0).astype(np.int32)
        e = np.clip(e, 0, 254)
        q = _nearest_levels(x, e8m0_half(e))
        if w is not None:
            best = (w * (KVALUES[q] * e8m0_half(e)[:, None] - x) ** 2).sum(-1)
            for de in (-1, 1):
                e2 = np.clip(e + de, 0, 254)
                q2 = _nearest_levels(x, e8m0_half(e2))
                err = (w * (KVALUES[q2] * e8m0_half(e2)[:, None] - x) ** 2).sum(-1)
                better = (err < best) & (amax > 0)
                e, q, best = np.where(better, e2, e), np.where(better[:, None], q2, q), np.where(better, err, best)
        return np.concatenate([e.astype(np.uint8)[:, None], pack_nibbles(q)], axis=1)
