"""Quantization-aware training of a CNN: PTQ first, then fine-tune weights and LSQ steps through the STE.

QAT starts from the PTQ model of the same scheme (BN folded, steps from round-to-nearest and the observers),
so the first step already computes exactly what PTQ computes; training then moves the latent float weights,
the biases, every step size (LSQ, gradient-scaled) and, for XNOR, the input thresholds. The training loop is
lowbit.vision.train.fit: deterministic, and a NaN loss stops it with a one-line error, keeping the last
good state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from lowbit.vision.ptq import quantize_cnn
from lowbit.vision.schemes import CNNScheme, get_scheme
from lowbit.vision.train import TrainConfig, fit

# Measured on the digits net (bench/vision_table.py): W4A4 recovers in a few epochs; binary layers need
# many more and a large SGD step (0.2 collapsed to chance, 0.1 reached ~95%).
QAT_DEFAULTS: dict[str, TrainConfig] = {
    "int8": TrainConfig(epochs=3, lr=0.005, weight_decay=0.0, optimizer="sgd"),
    "w4a4": TrainConfig(epochs=5, lr=0.01, weight_decay=0.0, optimizer="sgd"),
    "xnor": TrainConfig(epochs=60, lr=0.1, weight_decay=0.0, optimizer="sgd"),
}


@dataclass(frozen=True)
class QATConfig:
    """Scheme, optimizer settings (None: the scheme's default) and how many images calibrate the PTQ start."""

    scheme: str = "w4a4"
    train: TrainConfig | None = None
    calibration_images: int = 512

    def train_config(self) -> TrainConfig:
        return self.train or QAT_DEFAULTS[get_scheme(self.scheme).name]


def train_qat(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: QATConfig = QATConfig()) -> fx.GraphModule:
    """A fake-quant copy of float ``model`` under ``config.scheme``, calibrated on ``x`` and trained on (x, y)."""
    scheme: CNNScheme = get_scheme(config.scheme)
    qmodel = quantize_cnn(model, scheme, x[: config.calibration_images])
    return fit(qmodel, x, y, config.train_config(), what=f"{scheme.name} QAT")
