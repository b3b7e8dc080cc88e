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
    ``global_scale`` is the per-tensor FP32 second-level scale of ``scale=e4m3`` specs (NVFP4), shape (1,):
    an element is then ``code_value * scale / global_scale``; None for every other spec.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    spec: QuantSpec
    shape: tuple[int, ...]
    global_scale: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return self.codes.numel()


def split_rows(q: QTensor, sizes: list[int]) -> list[QTensor]:
    """Split a QTensor of row-stacked matrices (row-wise spec: channel or group) into one per matrix."""
    if len(sizes) == 1:
        return [q]
    if q.global_scale is not None or q.spec.granularity not in ("channel", "group") or len(q.shape) != 2:
        raise ValueError(f"split_rows needs a 2-D row-wise QTensor, got {q.spec} {q.shape}")
    out, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        zeros = None if q.zeros is None else q.zeros[rows].clone()
        out.append(QTensor(q.codes[rows].clone(), q.scales[rows].clone(), zeros, q.spec, (n, q.shape[1])))
        start += n
    return out


def cat_rows(parts: list[QTensor]) -> QTensor:
    """Stack row-wise QTensors (same spec and columns) into one: the inverse of ``split_rows``."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if any(p.global_scale is not None or p.spec != first.spec or len(p.shape) != 2 for p in parts):
        raise ValueError("cat_rows needs 2-D row-wise QTensors of one spec without a global scale")
    zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts])
    rows = sum(p.shape[0] for p in parts)
    return QTensor(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), zeros, first.spec,
                   (rows, first.shape[1]))
