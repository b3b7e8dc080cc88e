"""QTensor: plain data for one quantized tensor. Exporters and runtimes consume only this."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.spec import QuantSpec


@dataclass(frozen=True)
class QTensor:
    """Integer codes (one per element, unpacked, int16), per-block scales and zero points, and the spec.

    ``codes`` has the 2-D matrix shape of the weight; ``shape`` is the original tensor shape.
    ``scales`` and ``zeros`` have shape (n_block_rows, n_block_cols); ``zeros`` is None when symmetric.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    spec: QuantSpec
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return self.codes.numel()
