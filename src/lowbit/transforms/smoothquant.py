"""SmoothQuant: move activation outliers into the weights, s = max|x|^a / max|w|^(1-a) per input channel.

Used before quantizing activations (W8A8): inputs are divided by s (folded into the producing norm),
weight columns multiplied by s, so per-token activation ranges shrink while the float model is unchanged.
"""

from __future__ import annotations

import torch


def smoothing_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """Per-input-channel smoothing factors for the linears that share one input."""
    w_absmax = torch.cat([w.abs().float() for w in weights], dim=0).amax(0)
    s = x_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)
