"""CNN quantization schemes as plain data: one registry maps a name to what each layer kind becomes.

- ``int8``: per-output-channel symmetric int8 weights, static per-tensor 8-bit activations (uint8 after
  ReLU, int8 elsewhere), ranges from an observer on calibration images. The PTQ target and ONNX QDQ export.
- ``w7a8``: ``int8`` with 7-bit weights (codes within +-64, what onnxruntime's ``reduce_range`` does): its ONNX
  file runs on the fast uint8 x int8 kernel on every x86 CPU without saturating it, where full 8-bit weights
  need the exact but slower uint8 x uint8 kernel (ResNet-50, AVX-512 VNNI: 1.8x the latency; bench/RESULTS_vision.md).
- ``w4a4``: per-channel 4-bit weights and 4-bit static activations, every layer; QAT with LSQ steps.
- ``xnor``: XNOR-Net: every inner conv has binary weights (sign x per-channel mean|W|) and binarizes its
  input (sign with STE, scaled by K); the first conv and the last linear keep int8 weights and inputs, as
  XNOR-Net keeps its first and last layers in higher precision. Tensors between layers (the residual
  stream, pooling) stay 8-bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.formats.activation import OBSERVERS


@dataclass(frozen=True)
class CNNScheme:
    """Weight spec of inner layers (a lowbit spec string, or ``binary``), activation bits, and the edge layers.

    ``edge_weight``/``edge_act_bits``: spec and input bits for the first conv and the last linear (None: the
    same as inner layers). ``observer`` picks static activation ranges (minmax, percentile, mse, kl).
    """

    name: str
    weight: str
    act_bits: int
    edge_weight: str | None = None
    edge_act_bits: int | None = None
    observer: str = "mse"

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise LowbitError(f"unknown observer {self.observer!r}; use one of {', '.join(OBSERVERS)}")
        if not 2 <= self.act_bits <= 8:
            raise LowbitError(f"activation bits must be 2..8, got {self.act_bits}")

    @property
    def binary(self) -> bool:
        return self.weight == "binary"


SCHEMES: dict[str, CNNScheme] = {
    "int8": CNNScheme("int8", weight="int8:channel:scale=fp32", act_bits=8, observer="percentile"),
    "w7a8": CNNScheme("w7a8", weight="int7:channel:scale=fp32", act_bits=8, observer="percentile"),
    "w4a4": CNNScheme("w4a4", weight="int4:channel:mse:scale=fp32", act_bits=4),
    "xnor": CNNScheme("xnor", weight="binary", act_bits=8, edge_weight="int8:channel:scale=fp32", edge_act_bits=8),
}


def get_scheme(name: str) -> CNNScheme:
    """The scheme called ``name``, or a one-line error listing them."""
    try:
        return SCHEMES[name.lower()]
    except KeyError:
        raise LowbitError(f"unknown CNN scheme {name!r}; use one of {', '.join(SCHEMES)}") from None
