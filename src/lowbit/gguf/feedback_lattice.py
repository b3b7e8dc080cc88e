"""GPTQ-style error feedback inside the lattice i-quant grids (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S).

As for the affine types (``lowbit.gguf.feedback``), columns are quantized in order and each one's error is spread
over the columns not yet quantized through the upper Cholesky factor ``U`` of the inverse Hessian, so the layer's
output error is what gets minimised. The differences come from the lattice: values are quantized a *group* at a
time (4 or 8 neighbouring columns share one grid point), so per super-block of 256 columns

1. every super-block's signs, ``d`` and sub-block multipliers are fitted (``block.encode``, importance-weighted)
   on the weights as given (act-order, the default; in column order: on the error-corrected weights, one
   super-block at a time, just before its columns);
2. then, one sign group (8 columns) at a time, in descending order of the group's input energy (sum of diag(H);
   or in column order): the signs are re-chosen on the current values (the parity rule of IQ3_XXS / IQ2_XXS /
   IQ2_XS included), each grid group of the unit takes the point that minimises the GPTQ loss
   ``sum_j (w_j - q_j)^2 / U_jj^2`` at its fixed scale (an exhaustive search, ``best_points``), and the unit's
   columns push their errors forward one by one. Act-order measured 0.77-0.90x column order's output error.

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
                              importance: np.ndarray | None = None, damp: float = 0.01,
                              act_order: bool = True) -> np.ndarray:
    """Quantize ``weight`` (rows, cols) to ``block`` bytes (rows, cols / 256 * type_size) with error feedback.

    ``hessian`` is (cols, cols); ``importance`` (cols,) weights each super-block's scale fit (default diag(H)).
    ``act_order``: fit every super-block's signs and scales up front, then quantize the sign groups in descending
    order of their inputs' energy (sum of diag(H)); else super-block by super-block in column order.
    """
    rows, cols = weight.shape
    w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)).clone()
    h = torch.from_numpy(np.asarray(hessian, dtype=np.float64))
    imp = np.diag(hessian).astype(np.float32) if importance is None else np.asarray(importance, np.float32)
    imp = np.maximum(imp, imp.max() * 1e-6 + 1e-30)
    if act_order:
        return _act_order(w, h, block, imp, damp)
    hinv, dead = inverse_hessian_factor(h, damp)
    w[:, dead] = 0
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


def _unit(block: type[_Lattice]) -> int:
    """Columns decided together: a sign group of 8, or one grid point if wider."""
    return max(block.GRID.shape[1], SIGN_GROUP)


def _act_order(w: torch.Tensor, h: torch.Tensor, block: type[_Lattice], imp: np.ndarray, damp: float,
               span: int = 256) -> np.ndarray:
    """``lattice_feedback_quantize`` with every super-block's code fitted on ``w`` up front and the units (sign
    groups) quantized in descending order of their summed diag(H), each unit's columns kept together."""
    (rows, cols), unit, width = w.shape, _unit(block), block.GRID.shape[1]
    dead = torch.diag(h) == 0
    w[:, dead] = 0
    codes = [block.encode(w[:, c0:c0 + SUPER].numpy(), np.broadcast_to(imp[c0:c0 + SUPER], (rows, SUPER)))
             for c0 in range(0, cols, SUPER)]
    per_group = SUPER // width
    scale = np.concatenate([fp16_round(c.d)[:, None] * np.repeat(block.multiplier(c.ls), block.SCALE_GROUP // width,
                                                                  axis=1) for c in codes], axis=1)  # (rows, groups)
    energy = torch.diag(h).reshape(-1, unit).sum(-1)
    units = torch.argsort(energy, descending=True, stable=True)
    perm = (units[:, None] * unit + torch.arange(unit)).reshape(-1)
    hinv, _ = inverse_hessian_factor(h[perm][:, perm], damp)
    loss_weight = (1 / torch.diag(hinv) ** 2).numpy().astype(F32)
    w = w[:, perm].contiguous()
    for c0 in range(0, cols, span):
        c1 = min(c0 + span, cols)
        w1, err1, hinv1 = w[:, c0:c1].clone(), torch.zeros(rows, c1 - c0), hinv[c0:c1, c0:c1]
        for u0 in range(0, c1 - c0, unit):
            first = int(perm[c0 + u0])  # the unit's first original column
            sb, g0 = first // SUPER, (first % SUPER) // width
            x = w1[:, u0:u0 + unit].numpy()
            wt = np.ascontiguousarray(np.broadcast_to(loss_weight[c0 + u0:c0 + u0 + unit], x.shape))
            negative = block.signs(x, wt)
            t = np.where(negative, -x, x).astype(F32).reshape(-1, width)
            groups = unit // width
            s = scale[:, sb * per_group + g0:sb * per_group + g0 + groups]
            index = best_points(t, wt.reshape(-1, width), s.reshape(-1), block.GRID).reshape(rows, groups)
            codes[sb].index[:, g0:g0 + groups] = index
            codes[sb].negative[:, first % SUPER:first % SUPER + unit] = negative
            q = (s[:, :, None] * block.GRID[index]).reshape(rows, unit)
            q = torch.from_numpy(np.where(negative, -q, q).astype(F32))
            for j in range(u0, u0 + unit):
                err1[:, j] = (w1[:, j] - q[:, j - u0]) / hinv1[j, j]
                w1[:, j + 1:] -= err1[:, j, None] * hinv1[j, j + 1:][None, :]
        w[:, c1:] -= err1 @ hinv[c0:c1, c1:]
    return np.concatenate([block.pack_code(c) for c in codes], axis=1)


def _feedback_super_block(block: type[_Lattice], code: LatticeCode, w1: torch.Tensor, hinv1: torch.Tensor,
                          loss_weight: np.ndarray) -> torch.Tensor:
    """Re-pick ``code``'s signs and grid points unit by unit on the error-corrected ``w1`` (rows, 256), pushing
    each column's error forward within the super-block; fills ``code`` in place and returns the scaled errors."""
    rows, width = w1.shape[0], block.GRID.shape[1]
    unit = _unit(block)
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
