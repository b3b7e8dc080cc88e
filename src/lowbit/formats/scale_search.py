"""Choosing per-block scales: plain min/max, or an MSE-optimal clipping search over shrunken ranges.

The search tries ranges shrunk by factors 1, 1 - s/n, ..., 1 - s(n-1)/n and keeps, per block, the one with
the lowest (optionally importance-weighted) squared reconstruction error. Factor 1 is plain min/max and a
candidate only replaces it when strictly better, so the search is never worse than min/max.
"""

from __future__ import annotations

import torch

from lowbit.formats import blocks
from lowbit.formats.quantize import global_scale_of, minmax_params, params_from_range
from lowbit.formats.registry import get_format
from lowbit.formats.scales import scale_values, select
from lowbit.formats.spec import QuantSpec


def search_params(
    w2d: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zeros for a 2-D tensor by the spec's scale search (``minmax`` or ``mse``)."""
    if spec.scale_search == "mse":
        return mse_params(w2d, spec, importance=importance)
    return minmax_params(w2d, spec)


def mse_params(
    w2d: torch.Tensor,
    spec: QuantSpec,
    steps: int = 20,
    max_shrink: float = 0.5,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-block clipping that minimizes sum(importance * (w - q(w))^2); importance is per input column."""
    fmt = get_format(spec.format)
    block = spec.block_size(*w2d.shape)
    b, mask = blocks.to_blocks(w2d, block)
    weight = mask.to(w2d.dtype)
    if importance is not None:
        imp = importance.to(w2d.dtype).expand(w2d.shape)
        weight = weight * blocks.to_blocks(imp, block)[0]
    lo, hi = b.amin(-1), b.amax(-1)
    gs = global_scale_of(w2d, spec)
    best_scale, best_zero = params_from_range(lo, hi, spec, global_scale=gs)
    best_err = _block_error(b, weight, best_scale, best_zero, fmt, gs)
    for i in range(1, steps):
        scale, zero = params_from_range(lo, hi, spec, shrink=1.0 - max_shrink * i / steps, global_scale=gs)
        err = _block_error(b, weight, scale, zero, fmt, gs)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = select(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _block_error(b, weight, scale, zero, fmt, global_scale=None) -> torch.Tensor:
    s = scale_values(scale, global_scale)[..., None]
    z = None if zero is None else zero.float()[..., None]
    values = fmt.decode(fmt.encode(b / s, z))
    if z is not None:
        values = values - z
    return ((values * s - b) ** 2 * weight).sum(-1)
