"""Activation specs and the activation fake-quant kernel (W8A8, W4A8, FP8 activations).

An activation spec string is ``FORMAT:token:dynamic`` (one scale per token, computed on the fly) or
``FORMAT:tensor:static[:OBSERVER]`` (one scale per tensor, fixed from calibration by an observer:
minmax, percentile, mse or kl) or ``FORMAT:tensor:dynamic``. Activations are symmetric unless ``:asym`` is
given, which integer formats with dynamic scales allow: the range [min(0, min x), max(0, max x)] maps onto the
unsigned codes 0 .. 2^b - 1 with a rounded zero point. For int8 per tensor that is exactly ONNX's
DynamicQuantizeLinear, which onnxruntime fuses with the integer product that follows it, and it spends no
code on a side the data does not reach (a GELU's output is almost all positive).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.formats.integer import IntegerFormat
from lowbit.formats.registry import get_format

OBSERVERS = ("minmax", "percentile", "mse", "kl")


@dataclass(frozen=True)
class ActivationSpec:
    """How a linear layer's input is quantized at run time."""

    format: str = "int8"
    granularity: str = "token"
    dynamic: bool = True
    observer: str = "minmax"
    symmetric: bool = True

    def __post_init__(self) -> None:
        fmt = get_format(self.format)
        if self.granularity not in ("token", "tensor"):
            raise LowbitError(f"activation granularity must be 'token' or 'tensor', got {self.granularity!r}")
        if self.granularity == "token" and not self.dynamic:
            raise LowbitError("per-token activation scales can only be dynamic; use 'tensor:static' for static")
        if self.observer not in OBSERVERS:
            raise LowbitError(f"unknown observer {self.observer!r}; use one of {', '.join(OBSERVERS)}")
        if not self.symmetric and not (self.dynamic and isinstance(fmt, IntegerFormat)):
            raise LowbitError(f"asymmetric activations need an integer format with dynamic scales, got "
                              f"{self.format} {'dynamic' if self.dynamic else 'static'}")

    def __str__(self) -> str:
        parts = [self.format, self.granularity, "dynamic" if self.dynamic else "static"]
        if not self.dynamic:
            parts.append(self.observer)
        if not self.symmetric:
            parts.append("asym")
        return ":".join(parts)


def parse_activation_spec(text: str) -> ActivationSpec:
    """Parse e.g. ``int8:token:dynamic``, ``int8:tensor:static:kl`` or ``int8:tensor:dynamic:asym``."""
    tokens = [t.strip().lower() for t in text.split(":") if t.strip()]
    if not tokens:
        raise LowbitError("empty activation spec; write e.g. 'int8:token:dynamic'")
    fields: dict[str, object] = {"format": tokens[0]}
    for token in tokens[1:]:
        if token in ("token", "tensor"):
            fields["granularity"] = token
        elif token in ("dynamic", "static"):
            fields["dynamic"] = token == "dynamic"
        elif token in OBSERVERS:
            fields["observer"] = token
        elif token in ("asym", "sym"):
            fields["symmetric"] = token == "sym"
        else:
            raise LowbitError(f"unknown option {token!r} in activation spec {text!r}")
    return ActivationSpec(**fields)  # type: ignore[arg-type]


def max_code(spec: ActivationSpec) -> float:
    """The value a scale step count of the largest |x| maps to (127.5 for int8, the grid max for floats)."""
    return get_format(spec.format).max_code_magnitude(True)


def fake_quantize_activation(x: torch.Tensor, spec: ActivationSpec, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x``: per token or per tensor, with a dynamic scale or the given static one."""
    fmt = get_format(spec.format)
    xf = x.float()
    if not spec.symmetric:
        return _fake_quantize_asymmetric(xf, fmt.levels, spec.granularity == "token").to(x.dtype)
    if scale is None:
        amax = xf.abs().amax(dim=-1, keepdim=True) if spec.granularity == "token" else xf.abs().amax()
        scale = (amax / fmt.max_code_magnitude(True)).clamp_min(torch.finfo(torch.float32).tiny)
    return (fmt.decode(fmt.encode(xf / scale, None)) * scale).to(x.dtype)


def _fake_quantize_asymmetric(x: torch.Tensor, levels: int, per_token: bool) -> torch.Tensor:
    """Dynamic asymmetric quantize-dequantize, as ONNX DynamicQuantizeLinear defines it for levels = 255.

    The range always holds zero; scale = (hi - lo) / levels (1 when the range is empty); zero point =
    round(-lo / scale) clamped to the codes; codes = clamp(round(x / scale) + zero point). Rounding is
    half to even (torch.round), as the ONNX operator specifies.
    """
    if per_token:
        lo, hi = x.amin(dim=-1, keepdim=True).clamp(max=0), x.amax(dim=-1, keepdim=True).clamp(min=0)
    else:
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, levels)
    codes = (torch.round(x / scale) + zero).clamp(0, levels)
    return (codes - zero) * scale
