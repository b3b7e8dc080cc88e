"""AWQ: scale salient input channels up before rounding, choosing the exponent by the layer-output error.

For the linears that share one input, scales s = mean|x|^a / mean|w|^(1-a) (normalized) are tried for
a in {0, 1/n, ..., (n-1)/n}, plus no scaling at all. Each candidate is judged by the error it causes
in the linears' outputs on the calibration inputs, trace(dW H dW^T) with H = 2/n X^T X and
dW = Q(W diag(s)) diag(1/s) - W, which needs no extra forward pass. The best s is folded into the
producing norm/linear (see mappings), so the float model is unchanged.
"""

from __future__ import annotations

import torch

from lowbit.formats import blocks
from lowbit.formats.quantize import fake_quantize
from lowbit.formats.spec import QuantSpec


def weight_magnitude(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Mean over rows of |w| relative to its block's max, per input channel (AutoAWQ's w_mean)."""
    block = spec.block_size(*w.shape)
    b, _ = blocks.to_blocks(w.abs(), block)
    rel = b / (b.amax(-1, keepdim=True) + 1e-6)
    nr, nc = rel.shape[:2]
    br, bc = block
    full = rel.reshape(nr, nc, br, bc).permute(0, 2, 1, 3).reshape(nr * br, nc * bc)[: w.shape[0], : w.shape[1]]
    return full.mean(0)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """trace((w_hat - w) H (w_hat - w)^T): squared output error summed over calibration inputs (up to 2/n)."""
    d = w_hat - w
    return float(((d @ hessian) * d).sum())


def search_scales(weights: list[torch.Tensor], x_mean: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
                  grid: int = 20) -> tuple[torch.Tensor, float | None]:
    """(per-input-channel scales, chosen exponent or None for no scaling) minimizing the output error."""
    w = torch.cat([x.float() for x in weights], dim=0)
    w_mean = weight_magnitude(w, spec)
    best_scales = torch.ones_like(x_mean)
    best_err, best_alpha = output_error(w, fake_quantize(w, spec), hessian), None
    for i in range(grid):
        alpha = i / grid
        s = (x_mean.pow(alpha) / w_mean.pow(1 - alpha).clamp_min(1e-4)).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = output_error(w, fake_quantize(w * s, spec) / s, hessian)
        if err < best_err:
            best_err, best_scales, best_alpha = err, s, alpha
    return best_scales, best_alpha
