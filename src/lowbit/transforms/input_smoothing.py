"""SmoothQuant for a linear whose input has no producer to fold into: an explicit per-channel input scaling.

SmoothQuant divides input channel j by s_j and multiplies weight column j by s_j (the float product is
unchanged), so that a few outlier channels no longer set the range of a per-tensor activation grid. In a
pre-LN decoder 1/s folds into the norm before the linear; where the input also feeds something else (the
post-LN residual of a BERT layer, which reads the same LayerNorm output as its intermediate dense) or has no
norm before it, folding would change the model. There the division stays explicit: an ``InputSmoothing``
child module multiplies the input by 1/s in a forward pre-hook registered before any input quantizer, so the
quantizer, calibration (GPTQ's Hessian) and a traced graph all see the smoothed input; in ONNX it is one Mul
by a constant before the integer product, cheaper than per-token scales (a row reduction before the product and
a row scaling after it).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.transforms.smoothquant import smoothing_scales

DEFAULT_ALPHA = 0.5


class InputSmoothing(nn.Module):
    """Multiplies the input of the linear it is attached to by ``inverse_scale`` (1/s per input channel)."""

    def __init__(self, inverse_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("inverse_scale", inverse_scale.detach().float().reshape(-1))
        self._handle = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.inverse_scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.inverse_scale.numel()}"


def _smooth_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_smoothing(args[0]), *args[1:])


def attach_input_smoothing(linear: nn.Linear, scales: torch.Tensor) -> InputSmoothing:
    """Divide ``linear``'s input by ``scales`` per channel and multiply its weight columns by them.

    Must come before any input quantizer is attached (pre-hooks run in the order they were registered).
    """
    if getattr(linear, "input_smoothing", None) is not None:
        raise ValueError("this linear already has an input smoothing")
    if getattr(linear, "input_quantizer", None) is not None:
        raise ValueError("attach input smoothing before the input quantizer: it must see the smoothed input")
    scales = scales.detach().float().reshape(-1)
    if scales.numel() != linear.in_features or not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
        raise ValueError(f"smoothing scales must be {linear.in_features} positive finite values")
    with torch.no_grad():
        linear.weight.mul_(scales.to(linear.weight.dtype))
    smoothing = InputSmoothing(1.0 / scales)
    linear.input_smoothing = smoothing
    smoothing._handle = linear.register_forward_pre_hook(_smooth_input)
    return smoothing


def detach_input_smoothing(linear: nn.Linear) -> None:
    """Undo ``attach_input_smoothing``: the weight columns divided back, the hook removed."""
    smoothing = getattr(linear, "input_smoothing", None)
    if not isinstance(smoothing, InputSmoothing):
        return
    smoothing._handle.remove()
    with torch.no_grad():
        linear.weight.mul_(smoothing.inverse_scale.to(linear.weight.dtype))
    del linear.input_smoothing


def input_smoothings(model: nn.Module) -> dict[str, InputSmoothing]:
    """Every attached input smoothing, keyed by the name of its linear."""
    return {name: m.input_smoothing for name, m in model.named_modules()
            if isinstance(getattr(m, "input_smoothing", None), InputSmoothing)}


def linear_smoothing_scales(linear: nn.Linear, input_absmax: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """SmoothQuant's s = max|x|^alpha / max|w|^(1-alpha) per input channel of one linear."""
    return smoothing_scales(input_absmax.float(), [linear.weight.detach()], alpha)
