"""I-quant blocks on lattice grids: IQ3_XXS (256 values, 98 bytes), IQ3_S (110 bytes), IQ2_XXS (66 bytes).

Every group of values (4 for IQ3, 8 for IQ2_XXS) is one point of a grid table, taken from gguf-py (``IQ3_XXS.grid``:
256 points, coordinates in {4, 12, ..., 52, 62}; ``IQ3_S.grid``: 512 points, odd coordinates 1..15;
``IQ2_XXS.grid``: 256 points of 8 coordinates in {8, 25, 43}), times a sub-block scale, with a sign per value. A
32-value sub-block's scale is ``d * m(ls)``, ``d`` one fp16 per 256 values and ``ls`` a 4-bit multiplier index:
IQ3_XXS decodes ``d * (ls + 0.5) * 0.5``, IQ2_XXS ``d * (ls + 0.5) * 0.25``, IQ3_S ``d * (1 + 2 ls)``. IQ3_S stores
one sign bit per value; IQ3_XXS and IQ2_XXS store 7 per 8 values, the eighth being the parity (gguf-py's
``ksigns``), so when a group of 8 has an odd number of negatives the value cheapest to get wrong (smallest
``weight * x^2``) takes the other sign.

The encoder follows the idea of ggml's ``quantize_row_iq3_xxs_impl`` / ``quantize_row_iq3_s_impl`` /
``quantize_row_iq2_xxs_impl``, searched exhaustively instead of through neighbour lists: with the signs fixed, the
target of each value is ``|x|`` (``-|x|`` for a flipped one); for every group the weighted cross terms
``A = (w t) . g`` and ``B = w . g^2`` against all grid points ``g`` are two small matrix products, so for a trial
scale ``s`` the best point is ``argmin(s B - 2 A)``. Per sub-block a range of trial scales around
``max|t| / max(g)`` is tried, each scored by the least-squares error ``-(sum A)^2 / sum B``; the winner's
least-squares scale is kept. The eight sub-block scales
are then rounded onto ``d * m(ls)`` (``d`` refit by least squares), and every group re-picks its point on its final
scale, so the codes are exactly what the decoder will multiply. With an importance matrix the weights are as for
IQ4, ``importance * sqrt(sigma^2 + x^2)``; without one ``x^2 + sigma^2 / 4`` (sigma^2 twice the super-block's mean
square; ggml's default for IQ2_S), not ggml's ``x^2`` for IQ3: an exact search under ``x^2`` weights trades the small
values away (measured 2.2x ggml's plain squared error on Gaussian rows), while this keeps both the plain and the
``x^2``-weighted error below ggml's. (ggml's IQ2_XXS quantizer refuses to run without an importance matrix; here
it falls back to the same default weights.) Cost: about 5 s per million weights on one core.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import numpy as np
from gguf import quants as gguf_quants

from lowbit.gguf.blocks import BlockType
from lowbit.gguf.grid import F32, fp16_bytes, fp16_round, nearest_int
from lowbit.gguf.iquants import SUB, error_weights, seq_sum

SIGN_GROUP = 8             # values per IQ3_XXS / IQ2_XXS sign index (7 stored bits + parity)
TRIAL_RATIOS = np.linspace(0.7, 1.3, 16, dtype=F32)  # trial scales: max|t| / (max(g) * ratio)
CHUNK_SUBS = 1024          # sub-blocks searched at once: (8192 groups x grid points) float32 temporaries


def _grid(cls: type) -> np.ndarray:
    """gguf-py's decoded grid table for a quant class, (n_points, values per point) float32."""
    cls.init_grid()
    return np.ascontiguousarray(cls.grid.reshape(cls.grid_shape), dtype=F32)


class LatticeCode(NamedTuple):
    """One set of encoded super-blocks: value = fp16(d) * m(ls) * GRID[index] * (-1 if negative)."""

    d: np.ndarray         # (n_blocks,) float32, stored as fp16
    ls: np.ndarray        # (n_blocks, 256 / SCALE_GROUP) int32 sub-block multiplier indices, 0..15
    index: np.ndarray     # (n_blocks, 256 / grid width) int32 grid points
    negative: np.ndarray  # (n_blocks, 256) bool signs


def lattice_weights(x: np.ndarray, w: np.ndarray | None, group: int = SUB) -> np.ndarray:
    """Per-value error weights for super-blocks ``x`` (n, 256): IQ4's ``error_weights`` with importance ``w``,
    else ``x^2 + sigma^2 / 4`` with sigma^2 = 2 * mean square of the super-block. A ``group`` of values sharing
    one scale whose importance is all zero falls back to ``x^2``."""
    if w is not None:
        return error_weights(x, w, group)
    sq = (x * x).astype(F32)
    return (sq + (seq_sum(sq) * F32(0.5 / x.shape[-1]))[:, None]).astype(F32)


def best_points(t: np.ndarray, wt: np.ndarray, scale: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """For groups of targets ``t`` (m, grid width) with weights ``wt``, the grid point minimising
    sum wt * (t - scale * g)^2, one ``scale`` per group (m,); (m,) int32."""
    out = np.zeros(t.shape[0], np.int32)
    step = CHUNK_SUBS * SUB // grid.shape[1]
    both = np.concatenate([grid * grid, grid], axis=1).T  # cost = [s w, -2 w t] . [g^2, g], one product
    for lo in range(0, t.shape[0], step):
        w = wt[lo:lo + step]
        lhs = np.concatenate([scale[lo:lo + step, None] * w, F32(-2) * w * t[lo:lo + step]], axis=1)
        out[lo:lo + step] = np.argmin(lhs.astype(F32) @ both, axis=-1)
    return out


def _cross_terms(t: np.ndarray, wt: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``A = (wt t) . g`` and ``B = wt . g^2`` for every group and grid point, (m, G, n_points) each (2-D
    products: numpy's batched matmul is much slower for an inner dimension of 4)."""
    shape, width = (*t.shape[:-1], len(grid)), grid.shape[1]
    a = ((wt * t).reshape(-1, width) @ grid.T).reshape(shape)
    return a, (wt.reshape(-1, width) @ (grid * grid).T).reshape(shape)


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``a[..., idx]`` per group, summed over the groups of a row: (m,)."""
    return np.take_along_axis(a, idx[..., None], axis=-1)[..., 0].sum(-1)


def sub_block_scales(t: np.ndarray, wt: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Per sub-block of targets ``t`` (m, values per scale), the least-squares scale of the best of the trial
    scales (each with every group on its best grid point); 0 for sub-blocks whose targets are all <= 0."""
    out = np.zeros(t.shape[0], F32)
    step = CHUNK_SUBS * SUB // t.shape[1]  # the same number of groups at once, whatever the sub-block size
    for lo in range(0, t.shape[0], step):
        tg = t[lo:lo + step].reshape(-1, t.shape[1] // grid.shape[1], grid.shape[1])
        wg = wt[lo:lo + step].reshape(tg.shape)
        a, b = _cross_terms(tg, wg, grid)
        a2, cost = 2 * a, np.empty_like(a)
        amax = tg.reshape(len(tg), -1).max(-1)
        best_score, best_scale = np.zeros(len(tg), F32), np.zeros(len(tg), F32)
        for ratio in TRIAL_RATIOS:
            s = (amax / (grid.max() * ratio)).astype(F32)
            np.subtract(np.multiply(b, s[:, None, None], out=cost), a2, out=cost)
            idx = np.argmin(cost, axis=-1)
            sumqx, sumq2 = _take(a, idx), _take(b, idx)
            with np.errstate(divide="ignore", invalid="ignore"):
                score = np.where((sumqx > 0) & (sumq2 > 0), sumqx * sumqx / sumq2, 0).astype(F32)
                better = score > best_score
                best_scale = np.where(better, sumqx / sumq2, best_scale).astype(F32)
            best_score = np.where(better, score, best_score)
        out[lo:lo + step] = best_scale
    return out


class _Lattice(BlockType):
    """The lattice types: ``encode`` picks signs, scales and grid points, ``decoded`` is what llama.cpp
    reconstructs, ``pack_code`` lays them out as ggml's C struct. ``SCALE_GROUP`` values share one ``ls``."""

    GRID: ClassVar[np.ndarray]
    SCALE_GROUP: ClassVar[int] = SUB
    feedback = True
    FEEDBACK_UNIT: ClassVar[int] = SIGN_GROUP  # columns error feedback decides together (a sign group)

    @classmethod
    def repick(cls, code: LatticeCode, x: np.ndarray, wt: np.ndarray, at: int) -> np.ndarray:
        """Signs and grid points for the ``FEEDBACK_UNIT`` columns ``x`` (rows, unit) at super-block column ``at``,
        on the code's fixed scales and under weights ``wt``; written into ``code``; returns their values."""
        rows, unit, width = x.shape[0], x.shape[1], cls.GRID.shape[1]
        s = fp16_round(code.d) * cls.multiplier(code.ls[:, at // cls.SCALE_GROUP])  # one scale per row
        negative = cls.signs(x, wt)
        t = np.where(negative, -x, x).astype(F32).reshape(-1, width)
        index = best_points(t, wt.reshape(-1, width), np.repeat(s, unit // width), cls.GRID).reshape(rows, -1)
        code.index[:, at // width:(at + unit) // width] = index
        code.negative[:, at:at + unit] = negative
        q = (s[:, None, None] * cls.GRID[index]).reshape(rows, unit)
        return np.where(negative, -q, q).astype(F32)

    @classmethod
    def multiplier(cls, ls: np.ndarray) -> np.ndarray:
        """The factor ``m(ls)`` the decoder applies to ``d``, in its order of operations (float32)."""
        raise NotImplementedError

    @classmethod
    def multiplier_index(cls, ratio: np.ndarray) -> np.ndarray:
        """The ``ls`` (0..15) whose ``m(ls)`` is nearest to ``ratio`` (= scale / d)."""
        raise NotImplementedError

    @classmethod
    def signs(cls, x: np.ndarray, wt: np.ndarray) -> np.ndarray:
        """Which values are stored negative, (n, 256) bool: the sign of ``x`` (IQ3_XXS adjusts parity)."""
        return x < 0

    @classmethod
    def pack_code(cls, code: LatticeCode) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def encode(cls, x: np.ndarray, w: np.ndarray | None = None) -> LatticeCode:
        """Signs, scales and grid points for super-blocks ``x`` (n, 256); ``w`` (same shape) weights the error."""
        n, group = x.shape[0], cls.SCALE_GROUP
        wt = lattice_weights(x, w, group)
        negative = cls.signs(x, wt)
        t = np.where(negative, -x, x).astype(F32)  # what GRID * scale must approach; < 0 only where flipped
        scales = sub_block_scales(t.reshape(-1, group), wt.reshape(-1, group), cls.GRID).reshape(n, -1)
        d = (scales.max(-1) / cls.multiplier(np.full(1, 15))[0]).astype(F32)  # the largest onto ls = 15
        with np.errstate(divide="ignore", invalid="ignore"):
            ls = cls.multiplier_index(np.where(d[:, None] > 0, scales / d[:, None], 0).astype(F32))
        width = cls.GRID.shape[1]
        tg, wg = t.reshape(-1, width), wt.reshape(-1, width)
        m = np.repeat(cls.multiplier(ls), group // width, axis=1)  # (n, groups): one multiplier per group
        index = best_points(tg, wg, (fp16_round(d)[:, None] * m).reshape(-1), cls.GRID).reshape(n, -1)
        q = cls.GRID[index] * m[..., None]  # refit d by least squares on the chosen points, then re-pick
        tg, wg = tg.reshape(q.shape), wg.reshape(q.shape)
        sumqx, sumq2 = (wg * tg * q).sum((1, 2)), (wg * q * q).sum((1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(sumq2 > 0, sumqx / sumq2, d).astype(F32)
        d = np.maximum(d, F32(0))
        index = best_points(t.reshape(-1, width), wt.reshape(-1, width), (fp16_round(d)[:, None] * m).reshape(-1),
                            cls.GRID).reshape(n, -1)
        return LatticeCode(d, ls.astype(np.int32), index, negative)

    @classmethod
    def decoded(cls, code: LatticeCode) -> np.ndarray:
        """The float32 values the blocks decode to: (fp16(d) * m(ls)) * grid * sign, as the decoder multiplies."""
        n = code.index.shape[0]
        db = fp16_round(code.d)[:, None] * cls.multiplier(code.ls)  # (n, sub-blocks)
        values = cls.GRID[code.index].reshape(n, -1, cls.SCALE_GROUP)
        sign = np.where(code.negative, F32(-1), F32(1)).reshape(n, -1, cls.SCALE_GROUP)
        return (db[:, :, None] * values * sign).reshape(n, -1).astype(F32)

    @classmethod
    def quantize_blocks(cls, x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        return cls.pack_code(cls.encode(x, w))


def _bits_to_bytes(bits: np.ndarray) -> np.ndarray:
    """Booleans (..., 8k) -> bytes (..., k), bit j of byte i from element 8i + j."""
    return np.packbits(bits.astype(np.uint8).reshape(*bits.shape[:-1], -1, 8), axis=-1, bitorder="little")[..., 0]


class _ParitySigned(_Lattice):
    """IQ3_XXS and IQ2_XXS: 7 stored sign bits per 8 values (the eighth is the parity, gguf-py's ``ksigns``) and a
    32-bit word per sub-block, four 7-bit sign indices and ``ls`` in the top 4 bits; ``m(ls) = (ls + 0.5) * STEP``."""

    STEP: ClassVar[float]
    INTERLEAVED: ClassVar[bool]

    @classmethod
    def multiplier(cls, ls: np.ndarray) -> np.ndarray:
        return ((F32(0.5) + ls.astype(F32)) * F32(cls.STEP)).astype(F32)

    @classmethod
    def multiplier_index(cls, ratio: np.ndarray) -> np.ndarray:
        return np.clip(nearest_int(ratio / F32(cls.STEP) - F32(0.5)), 0, 15)

    @classmethod
    def signs(cls, x: np.ndarray, wt: np.ndarray) -> np.ndarray:
        """x < 0, except that in a group of 8 with an odd number of negatives the value with the smallest
        ``wt * x^2`` (the first on ties) flips, so that every group's sign mask has even parity."""
        negative = (x < 0).reshape(-1, SIGN_GROUP)
        odd = negative.sum(-1) % 2 == 1
        cheapest = np.argmin((wt * x * x).reshape(-1, SIGN_GROUP), axis=-1)
        rows = np.flatnonzero(odd)
        negative[rows, cheapest[rows]] ^= True
        return negative.reshape(x.shape)

    @classmethod
    def pack_code(cls, code: LatticeCode) -> np.ndarray:
        """d, then the grid indices (one byte each) and per sub-block a little-endian 32-bit word of four 7-bit
        sign indices and ``ls``: all indices before all words (IQ3_XXS), or each sub-block's indices followed by
        its word (IQ2_XXS's two words per sub-block)."""
        n = code.index.shape[0]
        masks = _bits_to_bytes(code.negative).reshape(n, -1, 4).astype(np.uint32)  # (n, 8 sub-blocks, 4 groups)
        words = ((masks & 0x7F) << (7 * np.arange(4, dtype=np.uint32))).sum(-1, dtype=np.uint32)
        words = (words | code.ls.astype(np.uint32) << 28).astype("<u4")[..., None].view(np.uint8)  # (n, 8, 4)
        index = code.index.astype(np.uint8).reshape(n, words.shape[1], -1)
        parts = [index, words] if cls.INTERLEAVED else [index.reshape(n, 1, -1), words.reshape(n, 1, -1)]
        return np.concatenate([fp16_bytes(code.d), np.concatenate(parts, axis=2).reshape(n, -1)], axis=1)


class IQ3_XXS(_ParitySigned):
    name = "IQ3_XXS"
    GRID = _grid(gguf_quants.IQ3_XXS)
    STEP, INTERLEAVED = 0.5, False


class IQ2_XXS(_ParitySigned):
    name = "IQ2_XXS"
    GRID = _grid(gguf_quants.IQ2_XXS)
    STEP, INTERLEAVED = 0.25, True


class IQ3_S(_Lattice):
    name = "IQ3_S"
    GRID = _grid(gguf_quants.IQ3_S)

    @classmethod
    def multiplier(cls, ls: np.ndarray) -> np.ndarray:
        return (F32(1) + F32(2) * ls.astype(F32)).astype(F32)

    @classmethod
    def multiplier_index(cls, ratio: np.ndarray) -> np.ndarray:
        return np.clip(nearest_int(F32(0.5) * (ratio - F32(1))), 0, 15)

    @classmethod
    def pack_code(cls, code: LatticeCode) -> np.ndarray:
        qs = (code.index & 0xFF).astype(np.uint8)
        qh = _bits_to_bytes(code.index >= 256)
        scales = (code.ls[:, 0::2] | (code.ls[:, 1::2] << 4)).astype(np.uint8)
        return np.concatenate([fp16_bytes(code.d), qs, qh, _bits_to_bytes(code.negative), scales], axis=1)
