"""GPTQ-style error feedback inside the lattice i-quant grids (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S).

As for the affine types (``lowbit.gguf.feedback``), columns are quantized in order and each one's error is spread
over the columns not yet quantized through the upper Cholesky factor ``U`` of the inverse Hessian, so the layer's
output error is what gets minimised. The differences come from the lattice: values are quantized a *group* at a
time (4 or 8 neighbouring columns share one grid point), so per super-block of 256 columns

1. the super-block's signs, ``d`` and sub-block multipliers are fitted (``block.encode``, importance-weighted) on
   the error-corrected weights, as the affine path fits its scales just before rounding;
2. then, one sign group (8 columns) at a time: the signs are re-chosen on the current values (the parity rule of
   IQ3_XXS / IQ2_XXS / IQ2_XS included), each group of the unit takes the grid point that minimises the GPTQ
   loss ``sum_j (w_j - q_j)^2 / U_jj^2`` at its fixed scale (an exhaustive search, ``best_points``), and the unit's
   columns push their errors forward one by one.

Rows are independent; the codes always lie on the grid llama.cpp decodes. Pure tensor math: weights, Hessian,
block type in; GGUF bytes out.
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.gguf.feedback import inverse_hessian_factor
from lowbit.gguf.grid import F32, fp16_round
from lowbit.gguf.iquants_grid import SIGN_GROUP, LatticeCode, _Lattice, best_points

SUPER = 256  # columns per super-block


def lattice_feedback_quantize(weight: np.ndarray, hessian: np.ndarray, block: type[_Lattice],
                              importance: np.ndarray | None = None, damp: float = 0.01) -> np.ndarray:
    """Quantize ``weight`` (rows, cols) to ``block`` bytes (rows, cols / 256 * type_size) with error feedback.

    ``hessian`` is (cols, cols); ``importance`` (cols,) weights each super-block's scale fit (default diag(H)).
    """
    rows, cols = weight.shape
    w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)).clone()
    hinv, dead = inverse_hessian_factor(torch.from_numpy(np.asarray(hessian, dtype=np.float64)), damp)
    w[:, dead] = 0
    imp = np.diag(hessian).astype(np.float32) if importance is None else np.asarray(importance, np.float32)
    imp = np.maximum(imp, imp.max() * 1e-6 + 1e-30)
    loss_weight = (1 / torch.diag(hinv) ** 2).numpy().astype(F32)  # GPTQ's per-column cost of an error
    out = []
    for c0 in range(0, cols, SUPER):
        c1 = c0 + SUPER
        w1, hinv1 = w[:, c0:c1].clone(), hinv[c0:c1, c0:c1]
        code = block.encode(w1.numpy(), np.broadcast_to(imp[c0:c1], (rows, SUPER)))
        err1 = _feedback_super_block(block, code, w1, hinv1, loss_weight[c0:c1])
        out.append(block.pack_code(code))
        w[:, c1:] -= err1 @ hinv[c0:c1, c1:]
    return np.concatenate(out, axis=1)


def _feedback_super_block(block: type[_Lattice], code: LatticeCode, w1: torch.Tensor, hinv1: torch.Tensor,
                          loss_weight: np.ndarray) -> torch.Tensor:
    """Re-pick ``code``'s signs and grid points unit by unit on the error-corrected ``w1`` (rows, 256), pushing
    each column's error forward within the super-block; fills ``code`` in place and returns the scaled errors."""
    rows, width = w1.shape[0], block.GRID.shape[1]
    unit = max(width, SIGN_GROUP)
    groups = unit // width
    scale = fp16_round(code.d)[:, None] * np.repeat(block.multiplier(code.ls), block.SCALE_GROUP // width, axis=1)
    err1 = torch.zeros_like(w1)
    for u0 in range(0, SUPER, unit):
        x = w1[:, u0:u0 + unit].numpy()
        wt = np.broadcast_to(loss_weight[u0:u0 + unit], x.shape)
        negative = block.signs(x, np.ascontiguousarray(wt))
        t = np.where(negative, -x, x).astype(F32).reshape(-1, width)
        g0 = u0 // width
        index = best_points(t, np.ascontiguousarray(wt).reshape(-1, width),
                            scale[:, g0:g0 + groups].reshape(-1), block.GRID).reshape(rows, groups)
        code.index[:, g0:g0 + groups] = index
        code.negative[:, u0:u0 + unit] = negative
        q = (scale[:, g0:g0 + groups, None] * block.GRID[index]).reshape(rows, unit)
        q = torch.from_numpy(np.where(negative, -q, q).astype(F32))
        for j in range(unit):
            i = u0 + j
            e = (w1[:, i] - q[:, j]) / hinv1[i, i]
            w1[:, i + 1:] -= e[:, None] * hinv1[i, i + 1:][None, :]
            err1[:, i] = e
    return err1
