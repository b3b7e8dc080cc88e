"""Ternary super-blocks: TQ1_0 (1.6875 bits/weight, base-3 packing) and TQ2_0 (2.0625, 2-bit packing).

value = d * (q - 1), q in {0, 1, 2}. Reference (no weights): d = absmax, q = roundf(x/d) + 1, as ggml's
``quantize_row_tq*_0_ref``. With weights, d comes from a weighted least-squares search over thresholds.
"""

from __future__ import annotations

import numpy as np

from lowbit.gguf.blocks import BlockType
from lowbit.gguf.grid import F32, Grid, fp16_bytes, fp16_round, nearest_int, roundf, safe_inverse

POW3 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)


def _ternary_scale(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per block, d minimising sum w*(x - d*q)^2 with q = clip(round(x/t), -1, 1) over trial thresholds t."""
    amax = np.abs(x).max(-1, keepdims=True)
    safe = np.where(amax > 0, amax, 1).astype(F32)
    best_d, best_err = np.zeros_like(amax), np.full(amax.shape, np.inf, F32)
    for c in np.linspace(0.2, 1.0, 33, dtype=F32):
        q = np.clip(nearest_int(x / (c * safe)), -1, 1).astype(F32)
        sumlx, suml2 = (w * x * q).sum(-1, keepdims=True), (w * q * q).sum(-1, keepdims=True)
        d = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1), 0).astype(F32)
        err = (w * (x - d * q) ** 2).sum(-1, keepdims=True)
        better = err < best_err
        best_d, best_err = np.where(better, d, best_d), np.where(better, err, best_err)
    return np.where(amax > 0, best_d, 0).astype(F32)


class _Ternary(BlockType):
    feedback = True

    @classmethod
    def fit(cls, x: np.ndarray, w: np.ndarray | None = None) -> Grid:
        d = np.abs(x).max(-1, keepdims=True).astype(F32) if w is None else _ternary_scale(x, w)
        ds = np.broadcast_to(fp16_round(d), x.shape)
        return Grid(scale=ds, offset=-ds, qmax=2, header={"d": d[:, 0]})

    @classmethod
    def reference_codes(cls, x: np.ndarray, grid: Grid) -> np.ndarray:
        return (roundf(x * safe_inverse(grid.header["d"])[:, None]) + 1).astype(np.uint8)


class TQ2_0(_Ternary):
    name = "TQ2_0"

    @classmethod
    def pack(cls, grid: Grid, codes: np.ndarray) -> np.ndarray:
        q = codes.reshape(-1, 2, 4, 32)
        qs = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)
        return np.concatenate([qs, fp16_bytes(grid.header["d"])], axis=1)


def _base3_bytes(q: np.ndarray, digits: int, width: int) -> np.ndarray:
    """Pack groups of ``digits`` trits (strided by ``width``) into bytes as ceil(v * 256 / 243)."""
    nb = q.shape[0]
    v = (q.reshape(nb, digits, width).astype(np.uint16) * POW3[:digits, None]).sum(1, dtype=np.uint16)
    return ((v * 256 + 242) // 243).astype(np.uint8)


class TQ1_0(_Ternary):
    name = "TQ1_0"

    @classmethod
    def pack(cls, grid: Grid, codes: np.ndarray) -> np.ndarray:
        q = codes.astype(np.uint16)
        parts = [_base3_bytes(q[:, :160], 5, 32), _base3_bytes(q[:, 160:240], 5, 16),
                 _base3_bytes(q[:, 240:], 4, 4)]
        return np.concatenate(parts + [fp16_bytes(grid.header["d"])], axis=1)
