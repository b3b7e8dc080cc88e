"""Fake-quantization kernels with straight-through gradients (pure tensor math, no modules).

- ``round_ste``: rounds in the forward pass, passes the gradient through unchanged (the STE).
- ``lsq_quantize``: LSQ (Esser et al., 2020): x -> clamp(round(x / s), qmin, qmax) * s with a learnable
  step s whose gradient is multiplied by ``grad_scale`` = 1 / sqrt(numel * qmax) (the paper's g), so that
  step sizes learn at a rate comparable to the weights. Values outside the grid get no gradient (clamp).
- ``sign_ste``: sign with +1 at zero (so codes are truly binary); its gradient passes where |x| <= 1
  (the hard-tanh STE of BinaryNet / XNOR-Net) and is zero outside.
- ``binary_weight``: XNOR-Net's weight approximation sign(W) * mean|W| per output channel.
- ``xnor_input_scale``: XNOR-Net's K: the mean of |x| over channels, averaged over each conv window.
"""

from __future__ import annotations

import math

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def scale_grad(x: torch.Tensor, g: float) -> torch.Tensor:
    """x forward (bit for bit); its gradient multiplied by ``g`` backward."""
    y = x * g
    return x.detach() + (y - y.detach())


def lsq_grad_scale(numel: int, qmax: float) -> float:
    """LSQ's step-size gradient scale 1 / sqrt(numel * qmax) for a step shared by ``numel`` values."""
    return 1.0 / math.sqrt(max(1, numel) * max(qmax, 1.0))


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, grad_scale: float) -> torch.Tensor:
    """clamp(round(x / step), qmin, qmax) * step, with STE and LSQ gradients; ``step`` broadcasts against x."""
    s = scale_grad(step, grad_scale)
    return torch.clamp(round_ste(x / s), qmin, qmax) * s


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """+1 where x >= 0 else -1; gradient 1 where |x| <= 1, else 0."""
    hard = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    soft = torch.clamp(x, -1.0, 1.0)
    return soft + (hard - soft).detach()


def binary_weight(w: torch.Tensor) -> torch.Tensor:
    """sign(w) * alpha, alpha = mean |w| over each output channel (dimension 0); STE through the sign."""
    alpha = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
    return sign_ste(w) * alpha


def xnor_input_scale(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                     padding: tuple[int, int]) -> torch.Tensor:
    """K (N, 1, H', W'): mean over channels of |x|, box-averaged over each kxk window of the conv."""
    a = x.abs().mean(dim=1, keepdim=True)
    box = torch.full((1, 1, *kernel), 1.0 / (kernel[0] * kernel[1]), dtype=x.dtype)
    return torch.conv2d(a, box, stride=stride, padding=padding)
