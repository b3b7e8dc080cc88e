"""I-quant blocks IQ1_S (256 values, 50 bytes) and IQ1_M (256 values, 56 bytes) on gguf-py's ternary grid.

Every group of 8 values is one of 2048 points of ``gguf.quants.IQ1_S.grid`` (coordinates in {-1, 0, 1}), shifted by
+-DELTA (0.125) and times a scale: value = (d * (2 ls + 1)) * (g + shift), ``d`` one fp16 per 256 values and ``ls``
a 3-bit index. IQ1_S has one ``ls`` and one shift per 32 values: fp16 d, qs[32] (each point's low 8 index bits),
qh uint16[8] (per 32 values: its 4 groups' 3 high index bits at bits 0-11, ls at 12-14, bit 15 set for -DELTA).
IQ1_M has one ``ls`` per 16 values and a shift per group of 8: qs[32], qh[16] (per 16 values, one nibble per
group: 3 high index bits, bit 3 set for -DELTA), scales as 4 uint16 (four 3-bit ls each, and in bits 12-15 of word i
bits 4i..4i+3 of the fp16 d).

The encoder (weights as for the other lattice types: ``lattice_weights``) takes three steps per scale group
(32 or 16 values). First the exact best scale ignoring the grid (``ternary_scales``: ggml's idea of solving the
ternary problem by sorting, here also exact for IQ1_M's two shifts per scale group, which ggml's search over two
split points in the order of ``x`` is not). At that scale every group takes its best point and shift, searched
exhaustively over the 2048 points of both shifted grids with ``best_points`` (IQ1_S: the shift with the lower error
summed over the 32 values), then the scale is refit by least squares (trying further scales around it lowered the
error by under 0.2%). Then ``d`` and the ``ls`` are chosen together (``super_scale``), and every group re-picks its
point and shift on its final scale, ``d`` is refit by least squares and the points re-picked once more, so the codes
are exactly what the decoder multiplies (no fudge factor on ``d`` as ggml's 1.125 / 1.1125).

Measured on Gaussian rows with outliers and an importance matrix: the importance-weighted error is 0.78-0.81x
llama.cpp's ``quantize_iq1_s`` and 0.78-0.79x its ``quantize_iq1_m`` (tests/gguf/test_iquants_iq1.py). Cost about
2 s per million weights on one core (576 x 1536 rows), three quarters of it the grid searches.
"""

from __future__ import annotations

import itertools
from typing import ClassVar, NamedTuple

import numpy as np
from gguf import quants as gguf_quants

from lowbit.gguf.blocks import BlockType
from lowbit.gguf.grid import F32, fp16_bytes, fp16_round, nearest_int
from lowbit.gguf.iquants_grid import _grid, best_points, lattice_weights

GROUP = 8                                  # values per grid point
DELTA = F32(gguf_quants.IQ1_S.delta)       # the shift, 0.125
GRID = _grid(gguf_quants.IQ1_S)            # (2048, 8), coordinates in {-1, 0, 1}
SHIFTED = (GRID + DELTA, GRID - DELTA)     # every point with a positive, a negative shift
MAX_LS = 7                                 # 3-bit multiplier index: multipliers 2 ls + 1 = 1, 3, ..., 15
D_TRIALS = np.linspace(0.7, 1.3, 25, dtype=F32)  # trial super-block scales, times the largest scale / 15
CHUNK_GROUPS = 512         # groups per grid search: the (512, 2048) float32 costs stay in cache (1.5x faster)
CHUNK_BLOCKS = 1024        # super-blocks encoded at once: some 30 MB of temporaries at peak


class IQ1Code(NamedTuple):
    """One set of encoded super-blocks: value = (fp16(d) * (2 ls + 1)) * (GRID[index] +- DELTA)."""

    d: np.ndarray         # (n_blocks,) float32, stored as fp16
    ls: np.ndarray        # (n_blocks, 256 / SCALE_SIZE) int32 multiplier indices, 0..7
    index: np.ndarray     # (n_blocks, 32) int32 grid points, one per 8 values
    negative: np.ndarray  # (n_blocks, 32) bool, per group of 8: shifted by -DELTA (else +DELTA)


def ternary_scales(x: np.ndarray, wt: np.ndarray, unit: int) -> np.ndarray:
    """Per scale group of ``x`` (m, size), the least-squares scale ``s`` of the best assignment of every value to
    ``s * (L + shift)``, L in {-1, 0, 1} and one shift +-DELTA per ``unit`` values, ignoring the grid.

    ggml's idea, exact by sorting: at its optimum every value sits on its nearest level, and as ``s`` falls from
    infinity a value leaves L = 0 at ``s = x / (shift +- 1/2)``, so for each choice of shifts the candidates are
    the size + 1 prefixes of the values in that order, scored by prefix sums of their least-squares terms."""
    sign = np.sign(x).astype(F32)
    best_score, best_scale = np.zeros(len(x), F32), np.zeros(len(x), F32)
    for shifts in itertools.product((DELTA, -DELTA), repeat=x.shape[1] // unit):
        shift = np.repeat(np.array(shifts, F32), unit)
        leaves_zero = x / (shift + F32(0.5) * sign + (sign == 0))  # the scale below which L = sign(x)
        order = np.argsort(-leaves_zero, axis=-1)
        first_qx, first_q2 = (wt * x) @ shift[:, None], DELTA * DELTA * wt.sum(-1, keepdims=True)  # all L = 0
        gain_qx = np.take_along_axis(wt * x * sign, order, -1)
        gain_q2 = np.take_along_axis(wt * sign * (sign + 2 * shift), order, -1)  # w ((L + c)^2 - c^2)
        sumqx = np.cumsum(np.concatenate([first_qx, gain_qx], axis=1), axis=1)
        sumq2 = np.cumsum(np.concatenate([first_q2, gain_q2], axis=1), axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where((sumqx > 0) & (sumq2 > 0), sumqx * sumqx / sumq2, 0)
            k = score.argmax(-1)[:, None]
            top = np.take_along_axis(score, k, -1)[:, 0]
            scale = np.take_along_axis(sumqx, k, -1)[:, 0] / np.take_along_axis(sumq2, k, -1)[:, 0]
        better = top > best_score
        best_scale, best_score = np.where(better, scale, best_scale), np.where(better, top, best_score)
    return best_scale.astype(F32)


def shifted_points(t: np.ndarray, wt: np.ndarray, scale: np.ndarray, unit: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For groups of 8 targets ``t`` (m, 8) with weights ``wt`` and one ``scale`` per group (m,), the grid point and
    shift minimising sum wt * (t - scale * (g + shift))^2, one shift per ``unit`` consecutive groups. Returns the
    indices (m,), the negative shifts (m,) and the chosen shifted points (m, 8)."""
    picks = [np.concatenate([best_points(t[lo:lo + CHUNK_GROUPS], wt[lo:lo + CHUNK_GROUPS],
                                         scale[lo:lo + CHUNK_GROUPS], grid) for lo in range(0, len(t), CHUNK_GROUPS)])
             for grid in SHIFTED]
    points = [grid[i] for grid, i in zip(SHIFTED, picks)]
    cost = [(wt * (t - scale[:, None] * q) ** 2).sum(-1).reshape(-1, unit).sum(-1) for q in points]
    negative = np.repeat(cost[1] < cost[0], unit)
    return np.where(negative, picks[1], picks[0]), negative, np.where(negative[:, None], points[1], points[0])


def group_scales(x: np.ndarray, wt: np.ndarray, unit: int) -> tuple[np.ndarray, np.ndarray]:
    """Per scale group of ``x`` (m, size): every group of 8 on its best point and shift at the ternary scale, then
    the least-squares scale of those points and ``sum wt q^2`` (how fast the error grows away from it)."""
    scale = np.repeat(ternary_scales(x, wt, unit * GROUP), x.shape[1] // GROUP)
    _, _, q = shifted_points(x.reshape(-1, GROUP), wt.reshape(-1, GROUP), scale, unit)
    q = q.reshape(x.shape)
    sumqx, sumq2 = (wt * x * q).sum(-1), (wt * q * q).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((sumqx > 0) & (sumq2 > 0), sumqx / sumq2, 0).astype(F32), sumq2.astype(F32)


def multiplier_index(scales: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The ``ls`` (0..7) whose multiplier ``2 ls + 1`` is nearest to ``scales / d`` (d broadcast on the last axis)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(d[..., None] > 0, scales / d[..., None], 0)
    return np.clip(nearest_int(F32(0.5) * (ratio - 1)), 0, MAX_LS)


def super_scale(scales: np.ndarray, curvature: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``d`` and ``ls`` for super-blocks whose scale groups (n, k) want ``scales``, the error of a group growing
    as ``curvature * (scale - wanted)^2``: for each trial ``d`` around the largest scale / 15, every ``ls``
    rounded and ``d`` refit by least squares; the trial with the smallest modelled error wins."""
    trial = (scales.max(-1) / F32(2 * MAX_LS + 1))[:, None] * D_TRIALS  # (n, trials)
    m = (2 * multiplier_index(scales[:, None, :], trial) + 1).astype(F32)  # (n, trials, k)
    c, s = curvature[:, None, :], scales[:, None, :]
    num, den = (c * m * s).sum(-1), (c * m * m).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(den > 0, num / den, 0).astype(F32)
    best = np.argmin((c * (d[..., None] * m - s) ** 2).sum(-1), axis=-1)[:, None]
    d = np.take_along_axis(d, best, -1)[:, 0]
    return d, multiplier_index(scales, d)


class _IQ1(BlockType):
    """The two IQ1 types: ``encode`` picks scales, shifts and grid points, ``decoded`` is what llama.cpp
    reconstructs, ``pack_code`` lays them out as ggml's C struct."""

    SCALE_SIZE: ClassVar[int]   # values per multiplier ls
    SHIFT_SIZE: ClassVar[int]   # values per shift sign
    feedback = True

    @classmethod
    def repick(cls, code: IQ1Code, x: np.ndarray, wt: np.ndarray, at: int) -> np.ndarray:
        """Points and shift for the ``FEEDBACK_UNIT`` (= one shift's) columns ``x`` (rows, unit) at super-block
        column ``at``, on the code's fixed scale; written into ``code``; returns their values."""
        rows, groups = x.shape[0], x.shape[1] // GROUP
        s = fp16_round(code.d) * (2 * code.ls[:, at // cls.SCALE_SIZE] + 1).astype(F32)  # one scale per row
        index, negative, q = shifted_points(x.reshape(-1, GROUP), wt.reshape(-1, GROUP), np.repeat(s, groups), groups)
        code.index[:, at // GROUP:at // GROUP + groups] = index.reshape(rows, groups)
        code.negative[:, at // GROUP:at // GROUP + groups] = negative.reshape(rows, groups)
        return (s[:, None] * q.reshape(rows, -1)).astype(F32)

    @classmethod
    def pack_code(cls, code: IQ1Code) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def encode(cls, x: np.ndarray, w: np.ndarray | None = None) -> IQ1Code:
        """Scales, shifts and grid points for super-blocks ``x`` (n, 256); ``w`` (same shape) weights the error."""
        n, unit = x.shape[0], cls.SHIFT_SIZE // GROUP
        wt = lattice_weights(x, w, cls.SCALE_SIZE)
        scales, curvature = group_scales(x.reshape(-1, cls.SCALE_SIZE), wt.reshape(-1, cls.SCALE_SIZE), unit)
        d, ls = super_scale(scales.reshape(n, -1), curvature.reshape(n, -1))
        m = np.repeat((2 * ls + 1).astype(F32), cls.SCALE_SIZE // GROUP, axis=1)  # (n, 32): one per group
        xg, wg = x.reshape(-1, GROUP), wt.reshape(-1, GROUP)
        index, negative, q = shifted_points(xg, wg, (fp16_round(d)[:, None] * m).reshape(-1), unit)
        mq = (q.reshape(n, -1, GROUP) * m[..., None]).reshape(n, -1)  # refit d on the chosen points, re-pick
        sumqx, sumq2 = (wt * x * mq).sum(-1), (wt * mq * mq).sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.maximum(np.where(sumq2 > 0, sumqx / sumq2, d), 0).astype(F32)
        index, negative, _ = shifted_points(xg, wg, (fp16_round(d)[:, None] * m).reshape(-1), unit)
        return IQ1Code(d, ls.astype(np.int32), index.reshape(n, -1), negative.reshape(n, -1))

    @classmethod
    def decoded(cls, code: IQ1Code) -> np.ndarray:
        """The float32 values the blocks decode to: (fp16(d) * (2 ls + 1)) * (grid + shift), as ggml multiplies."""
        n = code.index.shape[0]
        dl = np.repeat(fp16_round(code.d)[:, None] * (2 * code.ls + 1).astype(F32), cls.SCALE_SIZE // GROUP, axis=1)
        shifted = GRID[code.index] + np.where(code.negative, -DELTA, DELTA)[..., None]
        return (dl[..., None] * shifted).reshape(n, -1).astype(F32)

    @classmethod
    def quantize_blocks(cls, x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        parts = (slice(lo, lo + CHUNK_BLOCKS) for lo in range(0, len(x), CHUNK_BLOCKS))
        return np.concatenate([cls.pack_code(cls.encode(x[p], None if w is None else w[p])) for p in parts])


class IQ1_S(_IQ1):
    name = "IQ1_S"
    SCALE_SIZE, SHIFT_SIZE = 32, 32
    FEEDBACK_UNIT = SHIFT_SIZE

    @classmethod
    def pack_code(cls, code: IQ1Code) -> np.ndarray:
        """fp16 d, the low 8 bits of every index, then per 32 values a little-endian uint16: the 3 high index bits
        of its 4 groups at bits 0-11, ls at 12-14, bit 15 set for a negative shift."""
        n = code.index.shape[0]
        high = (code.index >> 8).astype(np.uint16).reshape(n, -1, 4) << (3 * np.arange(4, dtype=np.uint16))
        sub_block = code.ls.astype(np.uint16) << 12 | code.negative[:, ::4].astype(np.uint16) << 15
        qh = high.sum(-1, dtype=np.uint16) | sub_block
        qs = (code.index & 0xFF).astype(np.uint8)
        return np.concatenate([fp16_bytes(code.d), qs, qh.astype("<u2").view(np.uint8)], axis=1)


class IQ1_M(_IQ1):
    name = "IQ1_M"
    SCALE_SIZE, SHIFT_SIZE = 16, 8
    FEEDBACK_UNIT = SHIFT_SIZE

    @classmethod
    def pack_code(cls, code: IQ1Code) -> np.ndarray:
        """The low 8 bits of every index; per 16 values a byte of two nibbles (per group: 3 high index bits, bit 3
        set for a negative shift); four little-endian uint16, each four 3-bit ls and at bits 12-15 one nibble of
        fp16 d (word i holds d's bits 4i..4i+3)."""
        n = code.index.shape[0]
        nibble = ((code.index >> 8) | code.negative.astype(np.int32) << 3).astype(np.uint8).reshape(n, -1, 2)
        qh = nibble[..., 0] | nibble[..., 1] << 4
        ls = code.ls.astype(np.uint16).reshape(n, 4, 4) << (3 * np.arange(4, dtype=np.uint16))
        d_bits = fp16_bytes(code.d).view("<u2").astype(np.uint16)  # (n, 1)
        words = ls.sum(-1, dtype=np.uint16) | ((d_bits >> (4 * np.arange(4, dtype=np.uint16))) & 0xF) << 12
        qs = (code.index & 0xFF).astype(np.uint8)
        return np.concatenate([qs, qh, words.astype("<u2").view(np.uint8)], axis=1)
