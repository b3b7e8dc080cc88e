"""Activation specs and the activation fake-quant kernel (W8A8, W4A8, FP8 activations).

An activation spec string is ``FORMAT:token:dynamic`` (one scale per token, computed on the fly) or
``FORMAT:tensor:static[:OBSERVER]`` (one scale per tensor, fixed from calibration by an observer:
minmax, percentile, mse or kl) or ``FORMAT:tensor:dynamic``. Activations are always symmetric.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.formats.registry import get_format

OBSERVERS = ("minmax", "percentile", "mse", "kl")


@dataclass(frozen=True)
class ActivationSpec:
    """How a linear layer's input is quantized at run time."""

    format: str = "int8"
    granularity: str = "token"
    dynamic: bool = True
    observer: str = "minmax"

    def __post_init__(self) -> None:
        get_format(self.format)
        if self.granularity not in ("token", "tensor"):
            raise LowbitError(f"activation granularity must be 'token' or 'tensor', got {self.granularity!r}")
        if self.granularity == "token" and not self.dynamic:
            raise LowbitError("per-token activation scales can only be dynamic; use 'tensor:static' for static")
        if self.observer not in OBSERVERS:
            raise LowbitError(f"unknown observer {self.observer!r}; use one of {', '.join(OBSERVERS)}")

    def __str__(self) -> str:
        parts = [self.format, self.granularity, "dynamic" if self.dynamic else "static"]
        if not self.dynamic:
            parts.append(self.observer)
        return ":".join(parts)


def parse_activation_spec(text: str) -> ActivationSpec:
    """Parse e.g. ``int8:token:dynamic`` or ``int8:tensor:static:kl``."""
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
    if scale is None:
        amax = xf.abs().amax(dim=-1, keepdim=True) if spec.granularity == "token" else xf.abs().amax()
        scale = (amax / fmt.max_code_magnitude(True)).clamp_min(torch.finfo(torch.float32).tiny)
    return (fmt.decode(fmt.encode(xf / scale, None)) * scale).to(x.dtype)
