"""Fake-quant modules for CNNs: static activation quantizers and Conv2d/Linear with quantized weights.

Every quantizer holds its step size as a parameter, so post-training quantization (steps from observers and
round-to-nearest) and QAT (the same steps, learned with LSQ) are the same modules: QAT starts exactly
where PTQ ends. Weight fake-quant equals ``dequantize(quantize(w, spec, steps))`` of lowbit's formats (a test
checks it bit for bit), so what QAT trains is what ``qtensor()`` hands to exporters.

Integer grids follow lowbit's symmetric rule: a step s maps max|w| to (2^b - 1) / 2 and codes are
clamped to [-2^(b-1), 2^(b-1) - 1]. Activations after a ReLU use the unsigned grid [0, 2^b - 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats import QTensor, parse_spec, quantize
from lowbit.formats.integer import IntegerFormat
from lowbit.formats.registry import get_format
from lowbit.methods.rtn import rtn
from lowbit.observers.ranges import AbsSample, get_range_observer
from lowbit.training.ste import binary_weight, lsq_grad_scale, lsq_quantize, sign_ste, xnor_input_scale


def act_grid(bits: int, signed: bool) -> tuple[int, int, float]:
    """(qmin, qmax, max_code) of a ``bits`` activation grid; max_code is what a range threshold maps to."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, (2**bits - 1) / 2
    return 0, 2**bits - 1, float(2**bits - 1)


class ActQuant(nn.Module):
    """Static per-tensor fake-quant of an activation with a learnable (LSQ) step.

    While ``observing`` it passes values through unchanged and feeds an AbsSample; ``finish_observing``
    then sets the step from the named range observer.
    """

    def __init__(self, bits: int, signed: bool, observer: str = "mse"):
        super().__init__()
        self.bits, self.signed, self.observer = bits, signed, observer
        self.qmin, self.qmax, self.max_code = act_grid(bits, signed)
        self.step = nn.Parameter(torch.tensor(1.0))
        self.observing = False
        self._sample: AbsSample | None = None

    @property
    def zero_point(self) -> int:
        """Zero point of the codes in an unsigned 8-bit container (signed grids are offset by 2^(b-1))."""
        return -self.qmin

    def start_observing(self) -> None:
        self.observing, self._sample = True, AbsSample()

    def finish_observing(self) -> None:
        threshold = get_range_observer(self.observer)(self._sample, self.qmax)
        with torch.no_grad():
            self.step.fill_(max(threshold, 1e-8) / self.max_code)
        self.observing, self._sample = False, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._sample.update(x)
            return x
        return lsq_quantize(x, self.step, self.qmin, self.qmax, lsq_grad_scale(x[0].numel(), self.qmax))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, step={float(self.step.detach()):.4g}"


class WeightQuant(nn.Module):
    """Per-output-channel fake-quant of a weight on an integer spec; steps start at round-to-nearest's scales."""

    def __init__(self, weight: torch.Tensor, spec: str):
        super().__init__()
        self.spec = parse_spec(spec)
        fmt = get_format(self.spec.format)
        if not isinstance(fmt, IntegerFormat) or self.spec.granularity != "channel" or not self.spec.symmetric:
            raise ValueError(f"CNN weights take symmetric per-channel integer specs, not {self.spec}")
        self.qmin, self.qmax = fmt.signed_range()
        q = rtn(weight.detach(), self.spec)
        self.step = nn.Parameter(q.scales.float().reshape(-1))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        step = self.step.reshape(-1, *([1] * (w.dim() - 1)))
        return lsq_quantize(w, step, self.qmin, self.qmax, lsq_grad_scale(w[0].numel(), self.qmax))

    def qtensor(self, w: torch.Tensor, name: str = "weight") -> QTensor:
        """The weight as lowbit QTensor (codes and the current steps): what exporters consume."""
        return quantize(w.detach(), self.spec, params=(self.step.detach().reshape(-1, 1).clone(), None), name=name)


class QConv2d(nn.Conv2d):
    """Conv2d whose weight is fake-quantized per output channel (its input is quantized by an ActQuant)."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, spec: str) -> "QConv2d":
        q = _copy_into(cls.__new__(cls), conv)
        q.wq = WeightQuant(conv.weight, spec)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.wq(self.weight), self.bias)


class QLinear(nn.Linear):
    """Linear whose weight is fake-quantized per output row."""

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: str) -> "QLinear":
        q = _copy_into(cls.__new__(cls), linear)
        q.wq = WeightQuant(linear.weight, spec)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.wq(self.weight), self.bias)


class XnorConv2d(nn.Conv2d):
    """XNOR-Net conv: binary weights sign(W) * mean|W| per channel, binary inputs sign(x - t) scaled by K.

    ``threshold`` t (one per input channel, learnable) centres the input before its sign: inputs that come
    out of a ReLU are all >= 0, and their sign alone would be constant. It starts at the calibration mean.
    """

    @classmethod
    def from_float(cls, conv: nn.Conv2d) -> "XnorConv2d":
        q = _copy_into(cls.__new__(cls), conv)
        q.threshold = nn.Parameter(torch.zeros(conv.in_channels))
        q.observing, q._sums = False, None
        return q

    def start_observing(self) -> None:
        self.observing, self._sums = True, [torch.zeros(self.in_channels, dtype=torch.float64), 0]

    def finish_observing(self) -> None:
        with torch.no_grad():
            self.threshold.copy_((self._sums[0] / max(1, self._sums[1])).float())
        self.observing, self._sums = False, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._sums[0] += x.detach().double().sum(dim=(0, 2, 3))
            self._sums[1] += x.shape[0] * x.shape[2] * x.shape[3]
        centred = x - self.threshold.reshape(1, -1, 1, 1)
        scale = xnor_input_scale(centred, self.kernel_size, self.stride, self.padding)
        out = self._conv_forward(sign_ste(centred), binary_weight(self.weight), None) * scale
        return out if self.bias is None else out + self.bias.reshape(1, -1, 1, 1)


def _copy_into(new: nn.Module, old: nn.Module) -> nn.Module:
    """Initialise ``new`` (an uninitialised subclass instance) with ``old``'s state and parameters."""
    nn.Module.__init__(new)
    module_fields = set(vars(nn.Module()))
    for key, value in vars(old).items():
        if key not in module_fields:
            setattr(new, key, value)
    new.weight = nn.Parameter(old.weight.detach().clone())
    new.bias = None if old.bias is None else nn.Parameter(old.bias.detach().clone())
    return new
