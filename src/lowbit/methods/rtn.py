"""Round-to-nearest: scales from the spec's search (min/max or MSE clipping), then plain rounding.

Rows of a channel- or group-wise spec are independent, so a large tensor is rounded in slices of rows (same
codes and scales, bit for bit) and its float temporaries stay a few tens of MB instead of several copies of it.
"""

from __future__ import annotations

import torch

from lowbit.formats import blocks
from lowbit.formats.qtensor import QTensor, cat_rows
from lowbit.formats.quantize import check_finite, quantize
from lowbit.formats.scale_search import search_params
from lowbit.formats.scales import has_global_scale
from lowbit.formats.spec import QuantSpec

ROW_CHUNK_ELEMENTS = 1 << 23  # large row-wise tensors (a 262k-token embedding) are rounded 8M elements at a time


def rtn(w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None, name: str = "tensor",
        hessian: torch.Tensor | None = None, **_: object) -> QTensor:
    """Quantize ``w`` by rounding to the nearest grid point.

    Under an ``mse`` spec, ``importance`` (per input column) weights the clipping search, or ``hessian``
    (the input Hessian) makes it minimize the layer's output error instead.
    """
    check_finite(w, name)
    rows = max(1, ROW_CHUNK_ELEMENTS // max(1, w.shape[-1]))
    row_wise = spec.granularity in ("channel", "group") and not has_global_scale(spec.scale_dtype)
    if w.dim() == 2 and w.shape[0] > rows and row_wise:  # rows are independent: bound the float temporaries
        return cat_rows([_rtn(part, spec, importance, hessian, name) for part in w.detach().split(rows)])
    return _rtn(w, spec, importance, hessian, name)


def _rtn(w: torch.Tensor, spec: QuantSpec, importance, hessian, name: str) -> QTensor:
    w2d = blocks.as_matrix(w.detach().to(torch.float32))
    return quantize(w, spec, params=search_params(w2d, spec, importance, hessian), name=name)
