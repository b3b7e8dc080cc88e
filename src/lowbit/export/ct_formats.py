"""The compressed-tensors storage formats lowbit writes: which specs each holds, and its tensors per module.

Facts from compressed-tensors 0.20 (its compressors and ``forward.dequantize``), which this module follows:
- Integer codes are signed, ``q in [-2^(b-1), 2^(b-1)-1]``, also for asymmetric schemes, whose zero point is
  signed too: ``w = (q - z) * s``. lowbit's unsigned asymmetric codes and zeros are shifted by ``2^(b-1)``
  (the difference ``q - z`` is unchanged).
- ``pack-quantized``: ``weight_packed`` int32 [out, ceil(in*b/32)], each row a dense LSB-first stream of
  ``q + 2^(b-1)``; ``weight_scale`` [out, in/G] (group), [out, 1] (channel), [1] (tensor) or [R-blocks,
  C-blocks] (block); ``weight_shape`` int64 [out, in]; asymmetric group/channel zero points packed the
  same way along dim 0 (int32 [ceil(out*b/32), n_groups]), tensor/block zero points as plain int8.
- ``naive-quantized`` / ``int-quantized``: ``weight`` int8 [out, in] holding ``q``; zero points int8.
- ``float-quantized``: ``weight`` float8_e4m3fn; ``weight_scale`` as above.
- ``nvfp4-pack-quantized``: ``weight_packed`` uint8 [out, in/2], two E2M1 codes per byte (even element in
  the low nibble; code = sign bit 3 + index into [0, .5, 1, 1.5, 2, 3, 4, 6], lowbit's own code);
  ``weight_scale`` float8_e4m3fn [out, in/16]; ``weight_global_scale`` fp32 [1]; ``w = fp4 * s / global``.
- ``mxfp4-pack-quantized``: the same packing, ``weight_scale`` uint8 biased exponents [out, in/32].
- ``mxfp8-quantized``: ``weight`` float8_e4m3fn, ``weight_scale`` uint8 biased exponents [out, in/32].
- A group must never be cut short: compressed-tensors reshapes each row into ``in/G`` whole groups and
  refuses rows that are not a multiple of G (2-D blocks are padded, so they may end short).

``FORMATS`` is in compressed-tensors' own priority order (``infer_module_format``): the first format whose
``preferred`` test passes is the one llm-compressor would have written; ``holds`` is what a forced
``--format`` may store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lowbit.errors import LowbitError
from lowbit.export.int32_packing import pack_cols_int32, pack_rows_int32
from lowbit.formats.activation import ActivationSpec
from lowbit.formats.packing import pack_codes
from lowbit.formats.qtensor import QTensor
from lowbit.formats.spec import QuantSpec

INT_FORMATS = tuple(f"int{b}" for b in range(2, 9))
FLOAT_SCALES = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class CTFormat:
    """One compressed-tensors storage format: what it holds and how a module's tensors are laid out."""

    name: str
    holds: Callable[[QuantSpec], bool]
    preferred: Callable[[QuantSpec, ActivationSpec | None], bool]
    write: Callable[[QTensor], dict[str, torch.Tensor]]
    holds_text: str


def _is_int(spec: QuantSpec) -> bool:
    return spec.format in INT_FORMATS and spec.scale_dtype in FLOAT_SCALES


def _is_fp8(spec: QuantSpec) -> bool:
    return spec.format == "fp8_e4m3" and spec.scale_dtype in FLOAT_SCALES


def _signed_codes(qt: QTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes and zero points in compressed-tensors' signed convention (int16)."""
    if qt.zeros is None:
        return qt.codes, None
    offset = 1 << (qt.spec.bits - 1)
    return qt.codes - offset, qt.zeros.to(torch.int16) - offset


def _scale(qt: QTensor, values: torch.Tensor | None = None) -> torch.Tensor:
    """A per-block tensor (scales by default) in the shape compressed-tensors gives its strategy."""
    values = qt.scales if values is None else values
    return values.reshape(1) if qt.spec.granularity == "tensor" else values


def _pack_quantized(qt: QTensor) -> dict[str, torch.Tensor]:
    bits, offset = qt.spec.bits, 1 << (qt.spec.bits - 1)
    codes, zeros = _signed_codes(qt)
    out = {"weight_packed": pack_rows_int32(codes + offset, bits), "weight_scale": _scale(qt),
           "weight_shape": torch.tensor(list(qt.codes.shape), dtype=torch.int64)}
    if zeros is not None and qt.spec.granularity in ("group", "channel"):
        out["weight_zero_point"] = pack_cols_int32(zeros + offset, bits)
    elif zeros is not None:
        out["weight_zero_point"] = _scale(qt, zeros.to(torch.int8))
    return out


def _int8_weights(qt: QTensor) -> dict[str, torch.Tensor]:
    codes, zeros = _signed_codes(qt)
    out = {"weight": codes.to(torch.int8), "weight_scale": _scale(qt)}
    if zeros is not None:
        out["weight_zero_point"] = _scale(qt, zeros.to(torch.int8))
    return out


def _fp8_weights(qt: QTensor) -> dict[str, torch.Tensor]:
    return {"weight": _fp8_codes(qt), "weight_scale": _scale(qt)}


def _fp8_codes(qt: QTensor) -> torch.Tensor:
    return qt.codes.to(torch.uint8).view(torch.float8_e4m3fn)


def _fp4_nibbles(qt: QTensor) -> torch.Tensor:
    rows, cols = qt.codes.shape
    return pack_codes(qt.codes, 4, signed=False).reshape(rows, cols // 2)


def _nvfp4(qt: QTensor) -> dict[str, torch.Tensor]:
    return {"weight_packed": _fp4_nibbles(qt), "weight_scale": qt.scales,
            "weight_global_scale": qt.global_scale.to(torch.float32).reshape(1)}


def _mxfp4(qt: QTensor) -> dict[str, torch.Tensor]:
    return {"weight_packed": _fp4_nibbles(qt), "weight_scale": qt.scales.view(torch.uint8)}


def _mxfp8(qt: QTensor) -> dict[str, torch.Tensor]:
    return {"weight": _fp8_codes(qt), "weight_scale": qt.scales.view(torch.uint8)}


def _named(fmt: str) -> Callable[[QuantSpec], bool]:
    return lambda spec: spec.format == fmt


FORMATS: tuple[CTFormat, ...] = (
    CTFormat("mxfp4-pack-quantized", _named("mxfp4"), lambda s, a: s.format == "mxfp4", _mxfp4, "mxfp4"),
    CTFormat("mxfp8-quantized", _named("mxfp8"), lambda s, a: s.format == "mxfp8", _mxfp8, "mxfp8"),
    CTFormat("nvfp4-pack-quantized", _named("nvfp4"), lambda s, a: s.format == "nvfp4", _nvfp4, "nvfp4"),
    CTFormat("int-quantized", _is_int, lambda s, a: _is_int(s) and a is not None, _int8_weights,
             "int2..int8 with fp16/bf16/fp32 scales"),
    CTFormat("pack-quantized", _is_int, lambda s, a: _is_int(s) and (a is None or a.format in INT_FORMATS),
             _pack_quantized, "int2..int8 with fp16/bf16/fp32 scales"),
    CTFormat("float-quantized", _is_fp8, lambda s, a: _is_fp8(s) and a is not None, _fp8_weights,
             "fp8_e4m3 with fp16/bf16/fp32 scales"),
    CTFormat("naive-quantized", lambda s: _is_int(s) or _is_fp8(s), lambda s, a: _is_int(s) or _is_fp8(s),
             lambda qt: _fp8_weights(qt) if _is_fp8(qt.spec) else _int8_weights(qt),
             "int2..int8 or fp8_e4m3 with fp16/bf16/fp32 scales"),
)
FORMAT_NAMES = tuple(f.name for f in FORMATS)
HOLDS_TEXT = "int2..int8 and fp8_e4m3 (fp16/bf16/fp32 scales), nvfp4, mxfp4, mxfp8"


def get_format(name: str) -> CTFormat:
    """The compressed-tensors format called ``name``, or a one-line error listing them."""
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise LowbitError(f"unknown compressed-tensors format {name!r}; choose auto or one of {', '.join(FORMAT_NAMES)}")


def choose_format(spec: QuantSpec, act: ActivationSpec | None, forced: str | None) -> CTFormat | None:
    """The format a module is stored in: ``forced`` if it holds the spec, else compressed-tensors' own choice.

    None when no compressed-tensors format holds the spec (the caller names the alternatives).
    """
    if forced is not None:
        fmt = get_format(forced)
        return fmt if fmt.holds(spec) else None
    return next((f for f in FORMATS if f.preferred(spec, act)), None)


def weight_args(spec: QuantSpec) -> dict:
    """compressed-tensors ``QuantizationArgs`` (as JSON, in its field order) of a weight spec."""
    named = {
        "nvfp4": dict(num_bits=4, type="float", symmetric=True, group_size=16, strategy="tensor_group",
                      dynamic=False, scale_dtype="torch.float8_e4m3fn"),
        "mxfp4": dict(num_bits=4, type="float", symmetric=True, group_size=32, strategy="group",
                      dynamic=False, scale_dtype="torch.uint8"),
        "mxfp8": dict(num_bits=8, type="float", symmetric=True, group_size=32, strategy="group",
                      dynamic=False, scale_dtype="torch.uint8"),
    }
    if spec.format in named:
        return named[spec.format]
    args: dict = {"num_bits": spec.bits, "type": "float" if _is_fp8(spec) else "int", "symmetric": spec.symmetric,
                  "group_size": spec.group_size if spec.granularity == "group" else None,
                  "strategy": spec.granularity}
    if spec.granularity == "block":
        args["block_structure"] = list(spec.block_shape)
    args["dynamic"] = False
    return args


def activation_args(act: ActivationSpec) -> dict:
    """compressed-tensors ``QuantizationArgs`` of an activation spec (per token or per tensor)."""
    if act.format in INT_FORMATS:
        bits, kind = int(act.format[3:]), "int"
    elif act.format == "fp8_e4m3":
        bits, kind = 8, "float"
    else:
        raise LowbitError(f"activation spec {act} cannot be written as compressed-tensors: it quantizes "
                          "activations to int2..int8 or fp8_e4m3 only")
    return {"num_bits": bits, "type": kind, "symmetric": act.symmetric, "group_size": None, "strategy": act.granularity,
            "dynamic": act.dynamic}
