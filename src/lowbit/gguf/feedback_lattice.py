"""GPTQ-style error feedback inside the lattice i-quant grids (IQ3_XXS, IQ3_S, IQ2_*, IQ1_S, IQ1_M).

As for the affine types (``lowbit.gguf.feedback``), columns are quantized in order and each one's error is spread
over the columns not yet quantized through the upper Cholesky factor ``U`` of the inverse Hessian, so the layer's
output error is what gets minimised. The differences come from the lattice: values are quantized a *group* at a
time (4 or 8 neighbouring columns share one grid point), so per super-block of 256 columns

1. every super-block's signs, ``d`` and sub-block multipliers are fitted (``block.encode``, importance-weighted)
   on the weights as given (act-order, the default; in column order: on the error-corrected weights, one
   super-block at a time, just before its columns);
2. then, one unit at a time (``block.FEEDBACK_UNIT`` columns: a sign group of 8; IQ1_S 32 columns sharing one
   shift, IQ1_M one group of 8), in descending order of the group's input energy (sum of diag(H);
   or in column order): ``block.repick`` re-chooses the unit's signs on the current values (the parity rule of
   IQ3_XXS / IQ2_XXS / IQ2_XS included; IQ1: its shift) and gives each grid group the point that minimises the
   GPTQ loss ``sum_j (w_j - q_j)^2 / U_jj^2`` at its fixed scale (an exhaustive search), and the unit's columns
   push their errors forward one by one. Act-order measured 0.77-0.90x column order's output error.

Rows are independent; the codes always lie on the grid llama.cpp decodes. Pure tensor math: weights, Hessian,
block type in; GGUF bytes out.
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.gguf.blocks import BlockType
from lowbit.gguf.feedback import inverse_hessian_factor, push_error
from lowbit.gguf.grid import F32

SUPER = 256  # columns per super-block


def lattice_feedback_quantize(weight: np.ndarray, hessian: np.ndarray, block: type[BlockType],
                              importance: np.ndarray | None = None, damp: float = 0.01,
                              act_order: bool = True) -> np.ndarray:
    """Quantize ``weight`` (rows, cols) to ``block`` bytes (rows, cols / 256 * type_size) with error feedback.

    ``block`` has ``encode``, ``pack_code``, ``FEEDBACK_UNIT`` and ``repick`` (the lattice and IQ1 types).
    ``hessian`` is (cols, cols); ``importance`` (cols,) weights each super-block's scale fit (default diag(H)).
    ``act_order``: fit every super-block's signs and scales up front, then quantize the units in descending
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
        w1, err1, hinv1 = w[:, c0:c1].clone(), torch.zeros(rows, SUPER), hinv[c0:c1, c0:c1]
        code = block.encode(w1.numpy(), np.broadcast_to(imp[c0:c1], (rows, SUPER)))
        unit = block.FEEDBACK_UNIT
        for u0 in range(0, SUPER, unit):
            _feedback_unit(block, code, u0, w1, err1, hinv1, u0, loss_weight[c0 + u0:c0 + u0 + unit])
        out.append(block.pack_code(code))
        w[:, c1:] -= err1 @ hinv[c0:c1, c1:]
    return np.concatenate(out, axis=1)


def _act_order(w: torch.Tensor, h: torch.Tensor, block: type[BlockType], imp: np.ndarray, damp: float,
               span: int = 256) -> np.ndarray:
    """``lattice_feedback_quantize`` with every super-block's code fitted on ``w`` up front and the units
    quantized in descending order of their summed diag(H), each unit's columns kept together."""
    (rows, cols), unit = w.shape, block.FEEDBACK_UNIT
    dead = torch.diag(h) == 0
    w[:, dead] = 0
    codes = [block.encode(w[:, c0:c0 + SUPER].numpy(), np.broadcast_to(imp[c0:c0 + SUPER], (rows, SUPER)))
             for c0 in range(0, cols, SUPER)]
    units = torch.argsort(torch.diag(h).reshape(-1, unit).sum(-1), descending=True, stable=True)
    perm = (units[:, None] * unit + torch.arange(unit)).reshape(-1)
    hinv, _ = inverse_hessian_factor(h[perm][:, perm], damp)
    loss_weight = (1 / torch.diag(hinv) ** 2).numpy().astype(F32)
    w = w[:, perm].contiguous()
    for c0 in range(0, cols, span):
        c1 = min(c0 + span, cols)
        w1, err1, hinv1 = w[:, c0:c1].clone(), torch.zeros(rows, c1 - c0), hinv[c0:c1, c0:c1]
        for u0 in range(0, c1 - c0, unit):
            first = int(perm[c0 + u0])  # the unit's first original column
            _feedback_unit(block, codes[first // SUPER], first % SUPER, w1, err1, hinv1, u0,
                           loss_weight[c0 + u0:c0 + u0 + unit])
        w[:, c1:] -= err1 @ hinv[c0:c1, c1:]
    return np.concatenate([block.pack_code(c) for c in codes], axis=1)


def _feedback_unit(block: type[BlockType], code, at: int, w1: torch.Tensor, err1: torch.Tensor,
                   hinv1: torch.Tensor, u0: int, loss_weight: np.ndarray) -> None:
    """Quantize the unit at columns ``u0..`` of ``w1`` (super-block columns ``at..`` of ``code``, updated in
    place) and push each of its columns' errors forward through ``hinv1``."""
    x = w1[:, u0:u0 + block.FEEDBACK_UNIT].numpy()
    q = torch.from_numpy(block.repick(code, x, np.ascontiguousarray(np.broadcast_to(loss_weight, x.shape)), at))
    for j in range(u0, u0 + block.FEEDBACK_UNIT):
        push_error(w1, err1, hinv1, j, q[:, j - u0])
