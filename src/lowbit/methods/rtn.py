"""Round-to-nearest: scales from the spec's search (min/max or MSE clipping), then plain rounding."""

from __future__ import annotations

import torch

from lowbit.formats import blocks
from lowbit.formats.qtensor import QTensor
from lowbit.formats.quantize import check_finite, quantize
from lowbit.formats.scale_search import search_params
from lowbit.formats.spec import QuantSpec


def rtn(w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None, name: str = "tensor",
        hessian: torch.Tensor | None = None, **_: object) -> QTensor:
    """Quantize ``w`` by rounding to the nearest grid point.

    Under an ``mse`` spec, ``importance`` (per input column) weights the clipping search, or ``hessian``
    (the input Hessian) makes it minimize the layer's output error instead.
    """
    check_finite(w, name)
    w2d = blocks.as_matrix(w.detach().to(torch.float32))
    return quantize(w, spec, params=search_params(w2d, spec, importance, hessian), name=name)
