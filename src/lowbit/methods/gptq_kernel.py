"""GPTQ's innermost loop for integer formats, compiled: round a run of columns, pushing each one's error on.

GPTQ rounds one input column at a time and updates the columns after it before rounding the next, so the
loop cannot be batched across columns. Written as ~15 tensor operations per column it costs ~120 us a
column on SmolLM2's shapes (rows of 576-3072 values), nearly all of it dispatch: ~11 s of a 30-block
calibration run on one thread. Compiled with numba it is the arithmetic alone. The arithmetic is the
eager loop's: ``round(w / s)`` (half to even) clamped to the code range, the error ``w - deq`` kept for the
lazy block updates, and ``w_k -= h_ik * err`` for the later columns of the same sub-block; every row is
computed on its own, so the result does not depend on how rows are split or on the thread count.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit


def round_columns(W1: torch.Tensor, Hn1: torch.Tensor, Err1: torch.Tensor, Q1: torch.Tensor,
                  scales: torch.Tensor, zeros: torch.Tensor | None, code_range: tuple[int, int],
                  start: int, stop: int, end: int) -> None:
    """Round rows ``start:stop`` of the transposed block ``W1`` (one row per input column) in place.

    ``scales``/``zeros`` hold one row of per-output-channel parameters for each of those columns (zero points
    on the code grid: codes in ``code_range`` = [0, levels] then, else signed); codes go to ``Q1``, errors to
    ``Err1``, and each column's error, times ``Hn1``'s row (H^-1 factor rows over their diagonal), is
    subtracted from the columns after it up to ``end`` (the sub-block's end: later ones get it lazily)."""
    dtype = W1.dtype
    bounds = torch.tensor(code_range, dtype=dtype).numpy()
    no_zeros = torch.empty(0, W1.shape[1], dtype=dtype)
    _round_columns(W1.numpy(), Hn1.numpy(), Err1.numpy(), Q1.numpy(), scales.numpy(),
                   (no_zeros if zeros is None else zeros).numpy(), bounds, start, stop, end)


@njit(cache=True, nogil=True)
def _round_columns(W1, Hn1, Err1, Q1, scales, zeros, bounds, start, stop, end):  # pragma: no cover - compiled
    rows = W1.shape[1]
    lo, hi = bounds[0], bounds[1]
    asymmetric = zeros.shape[0] > 0
    for i in range(start, stop):
        p = i - start
        for r in range(rows):
            w = W1[i, r]
            s = scales[p, r]
            x = np.rint(w / s)
            if asymmetric:
                z = zeros[p, r]
                x = min(max(x + z, lo), hi)
                deq = (x - z) * s
            else:
                x = min(max(x, lo), hi)
                deq = x * s
            Q1[i, r] = x
            Err1[i, r] = w - deq
        for k in range(i + 1, end):
            h = Hn1[i, k]
            for r in range(rows):
                W1[k, r] -= h * Err1[i, r]
