"""The 32-value block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Without weights they reproduce ggml-quants.c ``quantize_row_*_ref`` byte for byte (what llama-quantize writes
without an importance matrix). With weights the scale (and min) come from a weighted least-squares search,
the way ggml's ``quantize_row_*_impl`` uses an imatrix; the byte layout is the same.
"""

from __future__ import annotations

import numpy as np

from lowbit.gguf.blocks import BlockType
from lowbit.gguf.grid import (F32, Grid, fp16_bytes, fp16_round, roundf, safe_inverse, signed_absmax,
                              weighted_affine_scale_min, weighted_symmetric_scale)

SYM_CANDIDATES = tuple(1.0 + 0.0125 * i for i in range(-12, 13))


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Element j in the low nibble and j+16 in the high nibble of byte j (32-value blocks)."""
    q = q.astype(np.uint8)
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def pack_high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of element j as bit j of a little-endian uint32 (Q5 types), as 4 bytes."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def _weights(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ggml's imatrix weighting: importance times sqrt(sigma^2 + x^2), sigma^2 the block's mean square."""
    sigma2 = (x * x).mean(-1, keepdims=True)
    return (w * np.sqrt(sigma2 + x * x)).astype(F32)


class _Symmetric(BlockType):
    """d * (q - zero), d stored fp16: Q4_0 (zero 8), Q5_0 (zero 16)."""

    feedback = True
    zero: int
    qmax: int

    @classmethod
    def fit(cls, x: np.ndarray, w: np.ndarray | None = None) -> Grid:
        if w is None:
            d = (signed_absmax(x) / F32(-cls.zero)).astype(F32)
        else:
            d = weighted_symmetric_scale(x, _weights(x, w), cls.zero, np.array(SYM_CANDIDATES, F32))
        ds = np.broadcast_to(fp16_round(d), x.shape)
        return Grid(scale=ds, offset=ds * F32(-cls.zero), qmax=cls.qmax, header={"d": d[:, 0]})

    @classmethod
    def reference_codes(cls, x: np.ndarray, grid: Grid) -> np.ndarray:
        idn = safe_inverse(grid.header["d"])[:, None]
        v = (x * idn + F32(cls.zero + 0.5)).astype(F32)
        return np.minimum(cls.qmax, np.trunc(v).astype(np.int8)).astype(np.uint8)



class Q4_0(_Symmetric):
    name, zero, qmax = "Q4_0", 8, 15

    @classmethod
    def pack(cls, grid: Grid, codes: np.ndarray) -> np.ndarray:
        return np.concatenate([fp16_bytes(grid.header["d"]), pack_nibbles(codes)], axis=1)


class Q5_0(_Symmetric):
    name, zero, qmax = "Q5_0", 16, 31

    @classmethod
    def pack(cls, grid: Grid, codes: np.ndarray) -> np.ndarray:
        return np.concatenate([fp16_bytes(grid.header["d"]), pack_high_bits(codes), pack_nibbles(codes)], axis=1)


class _MinMax(BlockType):
    """d * q + m with d, m stored fp16: Q4_1, Q5_1."""

    feedback = True
    qmax: int

    @classmethod
    def fit(cls, x: np.ndarray, w: np.ndarray | None = None) -> Grid:
        if w is None:
            mn = x.min(-1)
            d = ((x.max(-1) - mn) / F32(cls.qmax)).astype(F32)
        else:
            d, neg_min = weighted_affine_scale_min(x, _weights(x, w), cls.qmax, -1.0, 0.1, 20)
            mn = -neg_min
        ds, ms = fp16_round(d)[:, None], fp16_round(mn)[:, None]
        return Grid(scale=np.broadcast_to(ds, x.shape), offset=np.broadcast_to(ms, x.shape), qmax=cls.qmax,
                    header={"d": d, "m": mn.astype(F32)})

    @classmethod
    def reference_codes(cls, x: np.ndarray, grid: Grid) -> np.ndarray:
        idn = safe_inverse(grid.header["d"])[:, None]
        v = ((x - grid.header["m"][:, None]) * idn + F32(0.5)).astype(F32)
        return np.minimum(cls.qmax, np.trunc(v).astype(np.int8)).astype(np.uint8)



class Q4_1(_MinMax):
    name, qmax = "Q4_1", 15

    @classmethod
    def pack(cls, grid: Grid, codes: np.ndarray) -> np.ndarray:
        h = grid.header
        return np.concatenate([fp16_bytes(h["d"]), fp16_bytes(h["m"]), pack_nibbles(codes)], axis=1)


class Q5_1(_MinMax):
    name, qmax = "Q5_1", 31

    @classmethod
    def pack(cls, grid: Grid, codes: np.ndarray) -> np.ndarray:
        h = grid.header
        return np.concatenate([fp16_bytes(h["d"]), fp16_bytes(h["m"]), pack_high_bits(codes), pack_nibbles(codes)],
                              axis=1)


class Q8_0(BlockType):
    """d * q, q int8 in -127..127 (codes are stored here as q + 128 so the grid is 0-based)."""

    name, feedback = "Q8_0", True

    @classmethod
    def fit(cls, x: np.ndarray, w: np.ndarray | None = None) -> Grid:
        if w is None:
            d = (np.abs(x).max(-1, keepdims=True) / F32(127)).astype(F32)
        else:
            d = np.abs(weighted_symmetric_scale(x, _weights(x, w), 128, np.array(SYM_CANDIDATES, F32)))
        ds = np.broadcast_to(fp16_round(d), x.shape)
        return Grid(scale=ds, offset=ds * F32(-128), qmax=255, header={"d": d[:, 0]})

    @classmethod
    def reference_codes(cls, x: np.ndarray, grid: Grid) -> np.ndarray:
        q = roundf(x * safe_inverse(grid.header["d"])[:, None])
        return (q.astype(np.int16) + 128).astype(np.uint8)

    @classmethod
    def pack(cls, grid: Grid, codes: np.ndarray) -> np.ndarray:
        q = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        return np.concatenate([fp16_bytes(grid.header["d"]), q], axis=1)

