"""The k-quants: super-blocks of 256 values with quantized sub-block scales (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K).

Without weights, ``fit`` follows ggml-quants.c ``quantize_row_q*_K_ref`` (what llama-quantize writes without
an imatrix). With weights (an importance matrix broadcast over rows), the sub-block scales come from a
weighted search and the super-block scales from a weighted fit of the sub-scales, like ``quantize_row_q*_K_impl``.
Byte layouts follow ggml-common.h; the gguf package's dequantizers are the executable spec we test against.
"""

from __future__ import annotations

import numpy as np

from lowbit.gguf.blocks import BlockType
from lowbit.gguf.grid import (F32, Grid, fp16_bytes, fp16_round, nearest_int, positive_scale,
                              weighted_affine_scale_min, weighted_symmetric_scale)

QK_K = 256


def _qx_candidates(nmax: int, fine: bool) -> np.ndarray:
    """make_qx_quants' trial inverse scales (nmax + 0.1*i)/nmax, i in -9..9; twice as many when ``fine``."""
    steps = np.arange(-18, 19) * 0.05 if fine else np.arange(-9, 10) * 0.1
    return ((nmax + steps) / nmax).astype(F32)


def _imatrix_weights(x: np.ndarray, w: np.ndarray, sigma_factor: float) -> np.ndarray:
    """importance * sqrt(sigma^2 + x^2) per value; sigma^2 = factor * mean square of the super-block."""
    sigma2 = F32(sigma_factor) * (x * x).mean(-1, keepdims=True)
    return (w * np.sqrt(sigma2 + x * x)).astype(F32)


def _broadcast(per_sub: np.ndarray, sub: int) -> np.ndarray:
    return np.repeat(per_sub.astype(F32), sub, axis=-1)


def _crumbs(q: np.ndarray) -> np.ndarray:
    """2-bit codes (nb, 256) -> 64 bytes: byte 32c+l holds values 128c+l+32k at bits 2k."""
    q = q.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _nibbles64(q: np.ndarray) -> np.ndarray:
    """4-bit codes (nb, 256) -> 128 bytes: byte 32c+l holds value 64c+l (low) and 64c+32+l (high)."""
    q = q.reshape(-1, 4, 2, 32).astype(np.uint8) & 0xF
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> 12 bytes (ggml's get_scale_min_k4 layout)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return np.concatenate([lo, mid, hi], axis=1)


class _ScaleMin32(BlockType):
    """Q4_K / Q5_K: eight sub-blocks of 32, value = d*ls*q - dmin*lm, 6-bit ls and lm."""

    feedback = True
    nmax: int
    ref_search: tuple[float, float, int]

    @classmethod
    def fit(cls, x: np.ndarray, w: np.ndarray | None = None) -> Grid:
        nb = x.shape[0]
        xs = x.reshape(nb, 8, 32)
        if w is None:
            av = np.sqrt((xs * xs).mean(-1, keepdims=True))
            sc, mn = weighted_affine_scale_min(xs, (av + np.abs(xs)).astype(F32), cls.nmax, *cls.ref_search)
            d, ls = _max_scaled(sc, 63, clip=True)
            dmin, lm = _max_scaled(mn, 63, clip=True)
        else:
            wt = _imatrix_weights(x, w, 2.0).reshape(nb, 8, 32)
            sc, mn = weighted_affine_scale_min(xs, wt, cls.nmax, -0.9, 0.05, 36)
            sw = wt.sum(-1)
            d, ls = positive_scale(sc, sw, 63)
            dmin, lm = positive_scale(mn, sw, 63)
        scale = _broadcast(fp16_round(d)[:, None] * ls, 32)
        offset = -_broadcast(fp16_round(dmin)[:, None] * lm, 32)
        return Grid(scale=scale, offset=offset, qmax=cls.nmax, header={"d": d, "dmin": dmin, "ls": ls, "lm": lm})


def _max_scaled(v: np.ndarray, nmax: int, clip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Reference sub-scale quantization: d = max/nmax, L = nearest(v * nmax/max) (clipped to nmax if asked)."""
    mx = v.max(-1)
    inv = np.where(mx > 0, F32(nmax) / np.where(mx > 0, mx, 1), 0).astype(F32)
    q = nearest_int(inv[:, None] * v)
    if clip:
        q = np.minimum(nmax, q)
    return (mx / F32(nmax)).astype(F32), q.astype(np.uint8)


class Q4_K(_ScaleMin32):
    name, nmax, ref_search = "Q4_K", 15, (-1.0, 0.1, 20)

    @classmethod
    def pack(cls, grid: Grid, codes: np.ndarray) -> np.ndarray:
        h = grid.header
        return np.concatenate([fp16_bytes(h["d"]), fp16_bytes(h["dmin"]), _scale_min_k4(h["ls"], h["lm"]),
                               _nibbles64(codes)], axis=1)


class Q5_K(_ScaleMin32):
    name, nmax, ref_search = "Q5_K", 31, (-0.5, 0.1, 15)

    @classmethod
    def pack(cls, grid: Grid, codes: np.ndarray) -> np.ndarray:
        h = grid.header
        hb = (codes.reshape(-1, 4, 2, 32) >> 4).astype(np.uint8)
        shifts = (2 * np.arange(4, dtype=np.uint8))[None, :, None]
        qh = ((hb[:, :, 0] << shifts) | (hb[:, :, 1] << (shifts + 1))).sum(1, dtype=np.uint8)
        return np.concatenate([fp16_bytes(h["d"]), fp16_bytes(h["dmin"]), _scale_min_k4(h["ls"], h["lm"]),
                               qh, _nibbles64(codes)], axis=1)


class Q2_K(BlockType):
    """Sixteen sub-blocks of 16, value = d*(sc & 15)*q - dmin*(sc >> 4), q in 0..3."""

    name, feedback = "Q2_K", True

    @classmethod
    def fit(cls, x: np.ndarray, w: np.ndarray | None = None) -> Grid:
        nb = x.shape[0]
        xs = x.reshape(nb, 16, 16)
        if w is None:
            sc, mn = weighted_affine_scale_min(xs, np.abs(xs), 3, -0.5, 0.1, 15, mad=True)
            d, ls = _max_scaled(sc, 15, clip=False)
            dmin, lm = _max_scaled(mn, 15, clip=False)
        else:
            wt = _imatrix_weights(x, w, 1.0).reshape(nb, 16, 16)
            sc, mn = weighted_affine_scale_min(xs, wt, 3, -0.9, 0.05, 36)
            sw = wt.sum(-1)
            d, ls = positive_scale(sc, sw, 15)
            dmin, lm = positive_scale(mn, sw, 15)
        scale = _broadcast(fp16_round(d)[:, None] * ls, 16)
        offset = -_broadcast(fp16_round(dmin)[:, None] * lm, 16)
        return Grid(scale=scale, offset=offset, qmax=3, header={"d": d, "dmin": dmin, "ls": ls, "lm": lm})

    @classmethod
    def pack(cls, grid: Grid, codes: np.ndarray) -> np.ndarray:
        h = grid.header
        scales = (h["ls"] & 0xF) | ((h["lm"] & 0xF) << 4)
        return np.concatenate([scales, _crumbs(codes), fp16_bytes(h["d"]), fp16_bytes(h["dmin"])], axis=1)


class _Signed16(BlockType):
    """Q3_K / Q6_K: sixteen sub-blocks of 16 with signed scales, value = d*sc*(q - zero)."""

    feedback = True
    zero: int
    sc_bits: int

    @classmethod
    def _sub_scales(cls, x: np.ndarray, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        nb = x.shape[0]
        xs = x.reshape(nb, 16, 16)
        if w is None:
            return weighted_symmetric_scale(xs, xs * xs, cls.zero, _qx_candidates(cls.zero, False))[..., 0], None
        wt = _imatrix_weights(x, w, 2.0).reshape(nb, 16, 16)
        return weighted_symmetric_scale(xs, wt, cls.zero, _qx_candidates(cls.zero, True))[..., 0], wt.sum(-1)

    @classmethod
    def fit(cls, x: np.ndarray, w: np.ndarray | None = None) -> Grid:
        scales, sw = cls._sub_scales(x, w)
        half = 1 << (cls.sc_bits - 1)
        if sw is None:
            mx = np.take_along_axis(scales, np.abs(scales).argmax(-1)[:, None], axis=-1)
            iscale = np.where(mx != 0, F32(-half) / np.where(mx != 0, mx, 1), 0).astype(F32)
            sc = np.clip(nearest_int(iscale * scales), -half, half - 1)
            d = np.where(iscale != 0, F32(1) / np.where(iscale != 0, iscale, 1), 0).astype(F32)[:, 0]
        else:
            d = weighted_symmetric_scale(scales, sw, half, _qx_candidates(half, True))[:, 0]
            with np.errstate(divide="ignore", invalid="ignore"):
                sc = np.clip(nearest_int(np.where(d[:, None] != 0, scales / d[:, None], 0)), -half, half - 1)
        sc = sc.astype(np.int32)
        scale = _broadcast(fp16_round(d)[:, None] * sc, 16)
        return Grid(scale=scale, offset=scale * F32(-cls.zero), qmax=2 * cls.zero - 1, header={"d": d, "sc": sc})

    @classmethod
    def reference_codes(cls, x: np.ndarray, grid: Grid) -> np.ndarray:
        """ggml: l = nearest_int(x / (d*sc)) clipped to -zero..zero-1, stored + zero."""
        with np.errstate(divide="ignore", invalid="ignore"):
            q = nearest_int(np.where(grid.scale != 0, x / grid.scale, 0))
        return (np.clip(q, -cls.zero, cls.zero - 1) + cls.zero).astype(np.uint8)


class Q3_K(_Signed16):
    name, zero, sc_bits = "Q3_K", 4, 6

    @classmethod
    def pack(cls, grid: Grid, codes: np.ndarray) -> np.ndarray:
        l6 = (grid.header["sc"] + 32).astype(np.uint8)
        low = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
        top = ((l6 >> 4) & 3).reshape(-1, 4, 4)  # [group g = j // 4, i = j % 4]
        high = sum(top[:, g, :] << (2 * g) for g in range(4)).astype(np.uint8)
        q = codes.reshape(-1, 8, 32)
        hmask = sum(((q[:, b, :] > 3).astype(np.uint8) << b) for b in range(8)).astype(np.uint8)
        return np.concatenate([hmask, _crumbs(codes & 3), low, high, fp16_bytes(grid.header["d"])], axis=1)


class Q6_K(_Signed16):
    name, zero, sc_bits = "Q6_K", 32, 8

    @classmethod
    def pack(cls, grid: Grid, codes: np.ndarray) -> np.ndarray:
        q = codes.reshape(-1, 2, 4, 32).astype(np.uint8)
        lo = q & 0xF
        ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
        hi = q >> 4
        qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
        scales = grid.header["sc"].astype(np.int8).view(np.uint8)
        return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), scales, fp16_bytes(grid.header["d"])], axis=1)
