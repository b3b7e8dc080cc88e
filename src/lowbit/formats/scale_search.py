"""Choosing per-block scales: plain min/max, or an MSE-optimal clipping search over shrunken ranges.

The search picks, per block, among ranges shrunk by factors 1, 1 - s/n, ..., 1 - s(n-1)/n the one with the
lowest (optionally importance-weighted) squared reconstruction error: every other factor first, then each
block's two neighbours of its best one (n/2 + 2 error evaluations instead of n; the search's cost is in
them). Factor 1 is plain min/max and a candidate only replaces it when strictly better, so the search is
never worse than min/max.
Given the input Hessian H (row-wise specs: channel or group), the error of a block is instead its share of
the layer's output error, d H_gg d^T with H_gg the block's diagonal block of H (AWQ's clipping objective,
computed without a forward pass).
"""

from __future__ import annotations

import torch

from lowbit.formats import blocks
from lowbit.formats.quantize import global_scale_of, minmax_params, params_from_range
from lowbit.formats.registry import get_format
from lowbit.formats.scales import scale_values, select
from lowbit.formats.spec import QuantSpec


def search_params(
    w2d: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None, hessian: torch.Tensor | None = None,
    product_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zeros for a 2-D tensor by the spec's scale search (``minmax`` or ``mse``)."""
    if spec.scale_search == "mse":
        return mse_params(w2d, spec, importance=importance, hessian=hessian, product_dtype=product_dtype)
    return minmax_params(w2d, spec)


def mse_params(
    w2d: torch.Tensor,
    spec: QuantSpec,
    steps: int = 20,
    max_shrink: float = 0.5,
    importance: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    product_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-block clipping that minimizes sum(importance * (w - q(w))^2), or the output error under ``hessian``.

    ``product_dtype`` bf16 computes the output error's products ``d H_gg`` in bf16 (summed in fp32): ~4x faster
    where the CPU has bf16 units, each candidate's error within ~0.5%, so only near-ties may be decided
    otherwise than in fp32."""
    fmt = get_format(spec.format)
    block = spec.block_size(*w2d.shape)
    b, mask = blocks.to_blocks(w2d, block)
    weight = mask.to(w2d.dtype)
    if importance is not None:
        imp = importance.to(w2d.dtype).expand(w2d.shape)
        weight = weight * blocks.to_blocks(imp, block)[0]
    by_block = hessian is not None  # searched as (blocks, rows, size): one contiguous batched product per block
    if by_block:
        if block[0] != 1:
            raise ValueError(f"a Hessian clipping search needs a row-wise spec (channel or group), got {spec}")
        b = b.transpose(0, 1).contiguous()
        weight = (diagonal_blocks(hessian, block[1]).to(product_dtype),)  # zero where a block is padded: no mask
    lo, hi = b.amin(-1), b.amax(-1)
    gs = global_scale_of(w2d, spec)
    best_scale, best_zero = params_from_range(lo, hi, spec, global_scale=gs)
    best_err = _block_error(b, weight, best_scale, best_zero, fmt, gs)
    best_step = torch.zeros_like(best_err, dtype=torch.int64)
    factors = [1.0 - max_shrink * i / steps for i in range(steps)]
    factor_of = torch.tensor(factors, dtype=lo.dtype)

    def try_steps(step):  # a step for every block (a tensor), or one for all (an int)
        nonlocal best_scale, best_zero, best_err, best_step
        shrink = factor_of[step] if torch.is_tensor(step) else factors[step]
        scale, zero = params_from_range(lo, hi, spec, shrink=shrink, global_scale=gs)
        err = _block_error(b, weight, scale, zero, fmt, gs)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = select(better, scale, best_scale)
        best_step = torch.where(better, step, best_step)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)

    for i in range(2, steps, 2):  # every other step, then each block's two neighbours of its best one
        try_steps(i)
    coarse = best_step.clone()
    for offset in (-1, 1):
        try_steps((coarse + offset).clamp(1, steps - 1))
    if by_block:
        best_scale = best_scale.T.contiguous()
        best_zero = None if best_zero is None else best_zero.T.contiguous()
    return best_scale, best_zero


def _block_error(b, weight, scale, zero, fmt, global_scale=None) -> torch.Tensor:
    s = scale_values(scale, global_scale)[..., None]
    z = None if zero is None else zero.float()[..., None]
    values = _round_trip(fmt, b / s, z)  # a fresh temporary: the error is computed in place in it
    d = values.mul_(s).sub_(b)  # the search's time goes into these block-sized passes: as few as possible
    if isinstance(weight, tuple):  # (H's diagonal blocks,), b as (blocks, rows, size): output error d H_gg d^T
        hb = weight[0]
        dh = torch.bmm(d.to(hb.dtype), hb)
        return dh.to(d.dtype).mul_(d).sum(-1)  # fp32 x fp32: a mixed bf16 x fp32 product is 2x slower
    return d.mul_(d).mul_(weight).sum(-1)


def diagonal_blocks(hessian: torch.Tensor, size: int) -> torch.Tensor:
    """The (n_groups, size, size) diagonal blocks of H for groups of ``size`` columns (the last zero-padded)."""
    n = hessian.shape[0]
    groups = -(-n // size)
    padded = torch.zeros(groups * size, groups * size, dtype=torch.float32)
    padded[:n, :n] = hessian.float()
    return torch.stack([padded[i * size:(i + 1) * size, i * size:(i + 1) * size] for i in range(groups)])


def _round_trip(fmt, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """``x`` (a temporary, may be overwritten) on the format's grid, relative to the zero point:
    ``decode(encode(x, z)) - z``, in place where the format can do that (integers: no int16 round trip)."""
    in_place = getattr(fmt, "round_trip", None)
    if in_place is not None:
        return in_place(x, z)
    values = fmt.decode(fmt.encode(x, z))
    return values if z is None else values - z
