"""I-quant blocks IQ2_XS (256 values, 74 bytes) and IQ2_S (256 values, 82 bytes) on gguf-py's 8-wide lattice grids.

Every group of 8 values is one point of a grid table taken from gguf-py (``IQ2_XS.grid``: 512 points, ``IQ2_S.grid``:
1024 points, coordinates in {8, 25, 43}), times a scale, with a sign per value. Unlike IQ2_XXS, each 16 values (not
32) have their own 4-bit multiplier index ``ls``: their scale is ``d * (ls + 0.5) * 0.25``, ``d`` one fp16 per 256
values; ``scales[i]`` holds the 32-value sub-block ``i``'s two ``ls``, the first 16 values' in the low nibble.
IQ2_XS stores a little-endian 16-bit word per group, the grid index in the low 9 bits and 7 sign bits above them,
the eighth sign being the parity (gguf-py's ``ksigns``), as for IQ2_XXS; IQ2_S stores a 10-bit index (low bytes in
``qs[0:32]``, the top two bits four groups to a ``qh`` byte) and one explicit sign bit per value (``qs[32:64]``).

The encoder is the lattice search of ``iquants_grid`` (the idea of ggml's ``quantize_row_iq2_xs_impl`` /
``quantize_row_iq2_s_impl``, searched exhaustively over the grid instead of through neighbour lists) with
``SCALE_GROUP = 16``: per 16 values a range of trial scales, each group on its best grid point, the least-squares
scale of the best trial kept; the sixteen scales rounded onto ``d * m(ls)``, ``d`` refit, every group re-picked on its
final scale. Weights as for the other lattice types: ``importance * sqrt(sigma^2 + x^2)`` with an importance matrix,
else ``x^2 + sigma^2 / 4``; a 16-value group whose importance is all zero falls back to ``x^2``. Measured against
llama.cpp's own quantizers with an importance matrix, on Gaussian rows with outliers (three seeds), the
importance-weighted squared error is 0.78-0.82x llama.cpp's for IQ2_XS and 0.83-0.87x for IQ2_S. (ggml's IQ2_XS
quantizer refuses to run without an importance matrix; without one, IQ2_S's plain squared error is 0.89-0.90x
ggml's and its x^2-weighted error 0.43-0.56x.) Cost on one core: about 2 s (IQ2_XS) and 4 s (IQ2_S) per million
weights, the 1024-point grid making IQ2_S's search the longer.
"""

from __future__ import annotations

import numpy as np
from gguf import quants as gguf_quants

from lowbit.gguf.grid import fp16_bytes
from lowbit.gguf.iquants_grid import LatticeCode, _bits_to_bytes, _grid, _Lattice, _ParitySigned

SCALE_GROUP = 16  # values per 4-bit multiplier index


def _scale_bytes(ls: np.ndarray) -> np.ndarray:
    """Multiplier indices (n, 16) -> ``scales`` (n, 8): two per byte, the earlier 16 values in the low nibble."""
    return (ls[:, 0::2] | (ls[:, 1::2] << 4)).astype(np.uint8)


class IQ2_XS(_ParitySigned):
    name = "IQ2_XS"
    GRID = _grid(gguf_quants.IQ2_XS)
    STEP, SCALE_GROUP = 0.25, SCALE_GROUP

    @classmethod
    def pack_code(cls, code: LatticeCode) -> np.ndarray:
        """d, then per group of 8 a little-endian 16-bit ``index | sign_index << 9``, then the scales."""
        sign_index = _bits_to_bytes(code.negative).astype(np.uint16) & 0x7F  # the parity bit is implied
        qs = (code.index.astype(np.uint16) | sign_index << 9).astype("<u2").view(np.uint8)
        return np.concatenate([fp16_bytes(code.d), qs, _scale_bytes(code.ls)], axis=1)


class IQ2_S(_Lattice):
    name = "IQ2_S"
    GRID = _grid(gguf_quants.IQ2_S)
    SCALE_GROUP = SCALE_GROUP

    @classmethod
    def multiplier(cls, ls: np.ndarray) -> np.ndarray:
        return IQ2_XS.multiplier(ls)  # the same (ls + 0.5) * 0.25 per 16 values

    @classmethod
    def multiplier_index(cls, ratio: np.ndarray) -> np.ndarray:
        return IQ2_XS.multiplier_index(ratio)

    @classmethod
    def pack_code(cls, code: LatticeCode) -> np.ndarray:
        """d, the indices' low bytes, the sign bits (one byte per group), the indices' top two bits (four groups
        to a byte, the first in the lowest bits), then the scales."""
        n = code.index.shape[0]
        low = (code.index & 0xFF).astype(np.uint8)
        high = (code.index >> 8).reshape(n, -1, 4) << (2 * np.arange(4))
        qh = high.sum(-1).astype(np.uint8)
        return np.concatenate([fp16_bytes(code.d), low, _bits_to_bytes(code.negative), qh, _scale_bytes(code.ls)],
                              axis=1)
