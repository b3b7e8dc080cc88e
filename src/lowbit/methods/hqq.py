"""HQQ-style data-free optimization of zero points by half-quadratic splitting (Badri & Shaji, 2023).

The reconstruction error is measured with an lp "norm" (p < 1), which tolerates a few large errors
(outliers) in exchange for many small ones. Alternating steps: round with the current zero point; shrink
the residual with the generalized soft-threshold of the lp prox; set the zero point to the value that
best explains the rounded codes given the shrunk residual. The scale stays min/max; zero points are
floats (stored fp16), as in HQQ, so ``spec`` must be asymmetric. Cheap: no calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.formats import blocks
from lowbit.formats.qtensor import QTensor
from lowbit.formats.quantize import check_finite, params_from_range
from lowbit.formats.registry import get_format
from lowbit.formats.spec import QuantSpec


@dataclass(frozen=True)
class HQQOptions:
    """Iterations, lp exponent, and the penalty schedule beta <- kappa * beta."""

    iters: int = 20
    p: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-thresholding: the proximal step of (1/beta)|x|^p."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp_min(1e-8).pow(p - 1))


def hqq(w: torch.Tensor, spec: QuantSpec, options: HQQOptions = HQQOptions(), name: str = "tensor", **_: object) -> QTensor:
    """Quantize ``w`` with min/max scales and HQQ-optimized float zero points."""
    if spec.symmetric:
        raise LowbitError(f"{name}: hqq optimizes zero points; use an asymmetric spec (add ':asym')")
    check_finite(w, name)
    fmt = get_format(spec.format)
    lo_code, hi_code = fmt.zero_range()
    w2d = blocks.as_matrix(w.detach().to(torch.float32))
    block = spec.block_size(*w2d.shape)
    b, mask = blocks.to_blocks(w2d, block)
    scale, zero_int = params_from_range(b.amin(-1), b.amax(-1), spec)
    s = scale.float()[..., None]
    z = zero_int.float()[..., None]
    m = mask.float()
    count = m.sum(-1, keepdim=True)
    best_z, best_err = z.clone(), torch.full_like(z, float("inf"))
    beta = options.beta
    for _ in range(options.iters):
        q = torch.clamp(torch.round(b / s + z), lo_code, hi_code)
        r = (q - z) * s
        err = ((b - r).abs() * m).sum(-1, keepdim=True) / count
        better = err < best_err
        best_err, best_z = torch.where(better, err, best_err), torch.where(better, z, best_z)
        e = shrink_lp(b - r, beta, options.p)
        z = ((q - (b - e) / s) * m).sum(-1, keepdim=True) / count
        beta *= options.kappa
    zeros = best_z[..., 0].to(torch.float16)
    z_full = blocks.expand(zeros.float(), tuple(w2d.shape), block)
    s_full = blocks.expand(scale.float(), tuple(w2d.shape), block)
    codes = torch.clamp(torch.round(w2d / s_full + z_full), lo_code, hi_code).to(torch.int16)
    return QTensor(codes=codes, scales=scale, zeros=zeros, spec=spec, shape=tuple(w.shape))
