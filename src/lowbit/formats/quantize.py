"""Quantize and dequantize one tensor onto a spec's grid, given (or deriving) per-block scales.

These are the primitives every method and exporter shares: ``quantize`` returns a QTensor,
``dequantize`` turns it back into floats, and ``fake_quantize`` is exactly their composition.
Scales are stored as the spec says (scales.py); ``scale=e4m3`` specs also carry a per-tensor global scale,
which is a function of the tensor alone (448 * qmax / amax(w)), so it is recomputed wherever it is needed.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats import blocks
from lowbit.formats import scales as scale_rules
from lowbit.formats.qtensor import QTensor
from lowbit.formats.registry import get_format
from lowbit.formats.spec import QuantSpec

SCALE_TORCH_DTYPES = scale_rules.SCALE_TORCH_DTYPES


def check_finite(w: torch.Tensor, name: str = "tensor") -> None:
    """Refuse NaN or Inf values with a one-line error: no grid can represent them."""
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise LowbitError(f"{name} has {bad} NaN/Inf values; fix or skip this tensor before quantizing")


def global_scale_of(w2d: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """The per-tensor FP32 global scale a ``scale=e4m3`` spec uses for ``w2d`` (None for other specs)."""
    if not scale_rules.has_global_scale(spec.scale_dtype):
        return None
    qmax = get_format(spec.format).max_code_magnitude(True)
    return scale_rules.global_scale(w2d.abs().amax(), qmax, spec.scale_dtype)


def params_from_range(
    lo: torch.Tensor,
    hi: torch.Tensor,
    spec: QuantSpec,
    shrink: float = 1.0,
    global_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (in the spec's storage dtype) and zero points (int16, or None) for blocks with range [lo, hi].

    ``shrink`` < 1 clips the range (used by the MSE search). The range always contains zero, so that
    zero is exactly representable (GPTQ's convention). For ``scale=e4m3`` specs the global scale is
    ``global_scale`` if given, else the one of the unshrunk range of all blocks together; a caller that
    passes only part of a tensor must pass ``global_scale_of(whole_tensor, spec)``.
    """
    fmt = get_format(spec.format)
    if spec.symmetric:
        qmax = fmt.max_code_magnitude(True)
        amax = torch.maximum(lo.abs(), hi.abs())
        gs = global_scale
        if gs is None:
            gs = scale_rules.global_scale(amax.amax(), qmax, spec.scale_dtype)
        return scale_rules.block_scales(amax * shrink, qmax, spec.scale_dtype, gs), None
    scale_dtype = SCALE_TORCH_DTYPES[spec.scale_dtype]
    tiny = torch.finfo(scale_dtype).tiny
    lo = lo.clamp(max=0) * shrink
    hi = hi.clamp(min=0) * shrink
    scale = ((hi - lo) / fmt.max_code_magnitude(False)).clamp_min(tiny).to(scale_dtype)
    zmin, zmax = fmt.zero_range()
    zero = torch.round(-lo / scale.float()).clamp(zmin, zmax).to(torch.int16)
    return scale, zero


def minmax_params(w2d: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-block scales and zeros from each block's plain minimum and maximum, or the format's own rule."""
    block = spec.block_size(*w2d.shape)
    b, mask = blocks.to_blocks(w2d, block)
    own_rule = getattr(get_format(spec.format), "block_params", None)
    if own_rule is not None:
        return own_rule(b, mask, spec)
    return params_from_range(b.amin(-1), b.amax(-1), spec)


def encode(
    w2d: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    spec: QuantSpec,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integer codes of a 2-D float tensor for given per-block scales and zeros.

    ``scale=e4m3`` specs need the whole tensor's ``global_scale`` (see ``global_scale_of``): it is not
    guessed here, because ``w2d`` may be only part of the tensor.
    """
    fmt = get_format(spec.format)
    block = spec.block_size(*w2d.shape)
    if scale_rules.has_global_scale(spec.scale_dtype) and global_scale is None:
        raise ValueError(f"encode: {spec} needs the tensor's global_scale (use global_scale_of)")
    s = blocks.expand(scale_rules.scale_values(scales, global_scale), tuple(w2d.shape), block)
    z = None if zeros is None else blocks.expand(zeros.float(), tuple(w2d.shape), block)
    return fmt.encode(w2d / s, z)


def quantize(
    w: torch.Tensor,
    spec: QuantSpec,
    params: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    name: str = "tensor",
) -> QTensor:
    """Quantize ``w`` onto ``spec``'s grid; scales come from ``params`` or from the plain min/max."""
    check_finite(w, name)
    w2d = blocks.as_matrix(w.detach().to(torch.float32))
    if spec.granularity == "block" and w.dim() != 2:
        raise LowbitError(f"{name}: 2-D block granularity needs a 2-D tensor, got shape {tuple(w.shape)}")
    spec.check_shape(*w2d.shape, name=name)
    scales, zeros = params if params is not None else minmax_params(w2d, spec)
    gs = global_scale_of(w2d, spec)
    codes = encode(w2d, scales, zeros, spec, gs)
    return QTensor(codes=codes, scales=scales, zeros=zeros, spec=spec, shape=tuple(w.shape), global_scale=gs)


DEQUANT_CHUNK_ELEMENTS = 1 << 23


def dequantize(q: QTensor) -> torch.Tensor:
    """Float32 values the codes stand for, in the original tensor shape.

    A large row-wise tensor is decoded a slice of rows at a time into the output, so the temporaries stay
    small next to it (a 262k-token embedding would otherwise need several full float copies).
    """
    rows = max(1, DEQUANT_CHUNK_ELEMENTS // max(1, q.codes.shape[1]))
    if (q.codes.shape[0] <= rows or q.global_scale is not None or len(q.shape) != 2
            or q.spec.granularity not in ("channel", "group")):
        return _dequantize(q)
    out = torch.empty(q.codes.shape, dtype=torch.float32)
    for start in range(0, q.codes.shape[0], rows):
        part = slice(start, start + rows)
        zeros = None if q.zeros is None else q.zeros[part]
        n = out[part].shape[0]
        out[part] = _dequantize(QTensor(q.codes[part], q.scales[part], zeros, q.spec, (n, q.codes.shape[1])))
    return out


def _dequantize(q: QTensor) -> torch.Tensor:
    fmt = get_format(q.spec.format)
    block = q.spec.block_size(*q.codes.shape)
    values = fmt.decode(q.codes)
    if q.zeros is not None:
        values = values - blocks.expand(q.zeros.float(), tuple(q.codes.shape), block)
    step = scale_rules.scale_values(q.scales, q.global_scale)
    return (values * blocks.expand(step, tuple(q.codes.shape), block)).reshape(q.shape)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """dequantize(quantize(w)): the float tensor a quantized model really computes with."""
    return dequantize(quantize(w, spec))
