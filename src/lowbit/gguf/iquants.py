"""I-quant blocks on the non-linear 4-bit codebook: IQ4_NL (32 values, 18 bytes) and IQ4_XS (256, 136 bytes).

Each value is ``scale * KVALUES[code]``, KVALUES the 16 levels gguf-py decodes with (``gguf.quants.IQ4_NL.kvalues``,
denser near zero than a uniform grid). IQ4_NL stores one fp16 scale per 32 values; IQ4_XS one fp16 ``d`` per 256
values and eight signed 6-bit multipliers ``ls`` (stored biased by 32), one per 32-value sub-block, so a
sub-block's scale is ``d * ls``. The encoder follows the idea of ggml's ``quantize_row_iq4_nl_impl``: per
32-value block, scale the largest magnitude onto the codebook's end, then try 15 inverse scales around it, each
giving codes (nearest level) and a least-squares scale ``sum(w*x*q) / sum(w*q^2)``; keep the lowest weighted error.
IQ4_XS then rounds the block scales onto ``d * ls`` and re-rounds every value on its final scale.

Weights: ``x^2`` without an importance matrix (ggml's choice), else ``importance * sqrt(sigma^2 + x^2)`` with
sigma^2 twice the super-block's mean square. Sums run in index order in float32, as the C loops add, so the
reference path (no weights) writes llama.cpp's bytes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from gguf import quants as gguf_quants

from lowbit.gguf.blocks import BlockType
from lowbit.gguf.grid import F32, Grid, fp16_bytes, fp16_round, nearest_int, safe_inverse, signed_absmax
from lowbit.gguf.legacy import pack_nibbles

KVALUES = np.array(gguf_quants.IQ4_NL.kvalues, dtype=F32)  # the consumer's table, ascending
SUB = 32           # values per scale (IQ4_NL block, IQ4_XS sub-block)
NTRY = 7           # inverse scales (KVALUES[0] + t) / max, t in -NTRY..NTRY, as ggml tries
GROUP_MAX_EPS = F32(1e-15)  # blocks whose largest magnitude is below this get scale 0
# The levels are integers, so how many lie at or below v depends only on floor(v): a table over the range.
_AT_OR_BELOW = np.searchsorted(KVALUES, np.arange(KVALUES[0], KVALUES[-1] + 1, dtype=F32), side="right")


class IQ4Code(NamedTuple):
    """One set of encoded blocks: value = fp16(d) * ls * KVALUES[codes], per 32-value sub-block."""

    d: np.ndarray      # (n_blocks,) float32, stored as fp16
    ls: np.ndarray     # (n_blocks, n_sub) int32 sub-block multipliers in -32..31 (IQ4_NL: all 1)
    codes: np.ndarray  # (n_blocks, block_size) uint8 indices into KVALUES


def seq_sum(a: np.ndarray) -> np.ndarray:
    """Float32 sum over the last axis in index order, as a C loop accumulates (numpy's ``sum`` is pairwise)."""
    total = a[..., 0].astype(F32)
    for j in range(1, a.shape[-1]):
        total += a[..., j]
    return total


def nearest_level(v: np.ndarray) -> np.ndarray:
    """Index of the KVALUES level nearest to ``v`` (the upper one on ties), in float32 like ggml's
    ``best_index_int8``: values beyond either end take the end level. ``grid.nearest_level(KVALUES, v)`` by a
    table lookup instead of a binary search (the encoder's hot loop: 40% faster)."""
    v = np.asarray(v, dtype=F32)
    inside = np.floor(np.fmax(np.fmin(v, KVALUES[-1]), KVALUES[0])) - KVALUES[0]  # NaN -> the top, as in C
    mu = np.clip(_AT_OR_BELOW[inside.astype(np.intp)], 1, len(KVALUES) - 1)
    idx = np.where(v - KVALUES[mu - 1] < KVALUES[mu] - v, mu - 1, mu)
    idx = np.where(v <= KVALUES[0], 0, np.where(v >= KVALUES[-1], len(KVALUES) - 1, idx))
    return idx.astype(np.uint8)


def error_weights(x: np.ndarray, w: np.ndarray | None, group: int = SUB) -> np.ndarray:
    """Per-value error weights for super-blocks ``x`` (n, size): ``x^2`` without importance ``w``, else
    ``w * sqrt(sigma^2 + x^2)``, sigma^2 = 2 * mean square of the super-block. A ``group`` of values sharing one
    scale (a 32-value sub-block here; 16 in some lattice types) whose importance is all zero falls back to
    ``x^2`` (a zero-weight least-squares scale is undefined)."""
    sq = (x * x).astype(F32)
    if w is None:
        return sq
    sigma2 = (seq_sum(sq) * F32(2.0 / x.shape[-1]))[:, None]
    wt = (w * np.sqrt(sigma2 + sq)).astype(F32)
    alive = np.repeat(wt.reshape(x.shape[0], -1, group).sum(-1) > 0, group, axis=-1).reshape(x.shape)
    return np.where(alive, wt, sq)


def block_scales(x: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """Per 32-value block of ``x`` (m, 32), the scale ``s`` minimising sum wt*(x - s*KVALUES[code])^2 over the
    trial inverse scales (codes: nearest level of x/s); 0 for blocks below GROUP_MAX_EPS."""
    mx = signed_absmax(x)[:, 0]
    live = np.abs(mx) >= GROUP_MAX_EPS
    mx = np.where(live, mx, F32(1)).astype(F32)

    def sums(inverse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = KVALUES[nearest_level(inverse[:, None] * x)]
        wq = (wt * q).astype(F32)
        return seq_sum(wq * x), seq_sum(wq * q)

    with np.errstate(divide="ignore", invalid="ignore"):  # dead blocks divide 0 by 0; they end at scale 0
        sumqx, sumq2 = sums(F32(1) / (-mx / KVALUES[0]).astype(F32))  # the largest magnitude onto +-127
        d = (sumqx / sumq2).astype(F32)
        best = (d * sumqx).astype(F32)
        for t in range(-NTRY, NTRY + 1):
            sumqx, sumq2 = sums((F32(t + KVALUES[0]) / mx).astype(F32))
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d_try = (sumqx / sumq2).astype(F32)
            d = np.where(better, d_try, d)
            best = np.where(better, (d_try * sumqx).astype(F32), best)
    return np.where(live, d, F32(0)).astype(F32)


class _IQ4(BlockType):
    """The codebook types: ``scales`` picks the stored scales, ``encode`` adds the codes, ``decoded`` is what
    llama.cpp reconstructs, ``pack_code`` lays them out as ggml's C struct. ``fit``/``pack`` expose the same
    scales as a :class:`Grid` on the codebook, so error feedback can round onto it."""

    feedback = True

    @classmethod
    def scales(cls, x: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(d, ls)`` of ``IQ4Code`` for blocks ``x`` (n_blocks, block_size); ``w`` (same shape) weights the error."""
        raise NotImplementedError

    @classmethod
    def encode(cls, x: np.ndarray, w: np.ndarray | None = None) -> IQ4Code:
        """Scales and codes; each value re-rounded on its float32 sub-block scale ``d * ls``, as ggml does."""
        d, ls = cls.scales(x, w)
        dl = (d[:, None] * ls.astype(F32)).reshape(-1)
        codes = nearest_level(safe_inverse(dl)[:, None] * x.reshape(-1, SUB)).reshape(x.shape)
        return IQ4Code(d, ls, codes)

    @classmethod
    def pack_code(cls, code: IQ4Code) -> np.ndarray:
        """The blocks' bytes, (n_blocks, type_size) uint8."""
        raise NotImplementedError

    @classmethod
    def decoded(cls, code: IQ4Code) -> np.ndarray:
        """The float32 values the blocks decode to: (fp16(d) * ls) * level, in the decoder's order of operations."""
        n = code.codes.shape[0]
        dl = fp16_round(code.d)[:, None] * code.ls.astype(F32)
        return (dl[:, :, None] * KVALUES[code.codes].reshape(n, -1, SUB)).reshape(n, -1).astype(F32)

    @classmethod
    def quantize_blocks(cls, x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        return cls.pack_code(cls.encode(x, w))

    @classmethod
    def fit(cls, x: np.ndarray, w: np.ndarray | None = None) -> Grid:
        """The decoder's grid for the scales ``encode`` picks: per value, scale fp16(d) * ls on levels KVALUES."""
        d, ls = cls.scales(x, w)
        scale = np.repeat(fp16_round(d)[:, None] * ls.astype(F32), SUB, axis=1)
        return Grid(scale=scale, offset=np.zeros_like(scale), qmax=len(KVALUES) - 1, header={"d": d, "ls": ls},
                    levels=KVALUES)

    @classmethod
    def pack(cls, grid: Grid, codes: np.ndarray) -> np.ndarray:
        return cls.pack_code(IQ4Code(grid.header["d"], grid.header["ls"], codes))


class IQ4_NL(_IQ4):
    name = "IQ4_NL"

    @classmethod
    def scales(cls, x: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return block_scales(x, error_weights(x, w)), np.ones((x.shape[0], 1), np.int32)

    @classmethod
    def pack_code(cls, code: IQ4Code) -> np.ndarray:
        return np.concatenate([fp16_bytes(code.d), pack_nibbles(code.codes)], axis=1)


class IQ4_XS(_IQ4):
    name = "IQ4_XS"

    @classmethod
    def scales(cls, x: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Block scales of the 32-value sub-blocks, rounded onto ``d * ls`` (the largest onto ls = -32)."""
        n = x.shape[0]
        xs = x.reshape(-1, SUB)
        scales = block_scales(xs, error_weights(x, w).reshape(-1, SUB)).reshape(n, -1)
        d = (-signed_absmax(scales)[:, 0] / F32(32)).astype(F32)
        return d, np.clip(nearest_int(safe_inverse(d)[:, None] * scales), -32, 31)

    @classmethod
    def pack_code(cls, code: IQ4Code) -> np.ndarray:
        n = code.codes.shape[0]
        biased = (code.ls + 32).astype(np.uint16)  # 6 bits: low 4 in scales_l, high 2 in scales_h
        shifts = 2 * np.arange(biased.shape[1], dtype=np.uint16)
        scales_h = ((biased >> 4) << shifts).sum(-1, dtype=np.uint16).astype("<u2")[:, None].view(np.uint8)
        low = (biased & 0xF).astype(np.uint8)
        scales_l = low[:, 0::2] | (low[:, 1::2] << 4)
        qs = pack_nibbles(code.codes.reshape(-1, SUB)).reshape(n, -1)
        return np.concatenate([fp16_bytes(code.d), scales_h, scales_l, qs], axis=1)
