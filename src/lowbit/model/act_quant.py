"""Simulated activation quantization: an explicit ``input_quantizer`` submodule on each affected linear.

The quantizer is a real child module (visible in the module tree, its static scale a buffer), applied by a
forward pre-hook that it owns and removes on ``detach``. Exporters read the spec and scale from it to
place Quantize/Dequantize nodes.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats.activation import ActivationSpec, fake_quantize_activation


class InputQuantizer(nn.Module):
    """Fake-quantizes the input of the linear it is attached to."""

    def __init__(self, spec: ActivationSpec, scale: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        self.register_buffer("scale", None if scale is None else scale.detach().float().reshape(()))
        self._handle = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_activation(x, self.spec, self.scale)

    def extra_repr(self) -> str:
        return str(self.spec) + ("" if self.scale is None else f", scale={float(self.scale):.6g}")


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quantizer(args[0]), *args[1:])


def attach_input_quantizer(linear: nn.Linear, spec: ActivationSpec, scale: torch.Tensor | None = None) -> InputQuantizer:
    """Make ``linear`` quantize its input from now on (replacing any quantizer it had)."""
    detach_input_quantizer(linear)
    quantizer = InputQuantizer(spec, scale)
    linear.input_quantizer = quantizer
    quantizer._handle = linear.register_forward_pre_hook(_quantize_input)
    return quantizer


def detach_input_quantizer(linear: nn.Module) -> None:
    """Remove the input quantizer of ``linear``, if any."""
    quantizer = getattr(linear, "input_quantizer", None)
    if isinstance(quantizer, InputQuantizer):
        if quantizer._handle is not None:
            quantizer._handle.remove()
        del linear.input_quantizer


def input_quantizers(model: nn.Module) -> dict[str, InputQuantizer]:
    """Every attached input quantizer, keyed by the name of its linear."""
    return {name: m.input_quantizer for name, m in model.named_modules()
            if isinstance(getattr(m, "input_quantizer", None), InputQuantizer)}
