"""Quantized linears as integer matrix products that onnxruntime's CPU provider runs on int8 kernels.

A W8A8 linear (integer weights per channel or per tensor, int8 activations) becomes

    codes = QuantizeLinear(x, s, 128)             uint8, s = max|x| / 127.5 per token or per tensor
    acc   = MatMulInteger(codes, W_codes, 128, w_zero)              int32, exact
    y     = float(acc) * s * w_scale + bias

which equals lowbit's fake-quant model: same scales, round-half-even, clamp to [-128, 127]. An asymmetric
per-tensor input (``int8:tensor:dynamic:asym``) takes its codes, scale and zero point from one
DynamicQuantizeLinear instead; onnxruntime fuses that node with the product into DynamicQuantizeMatMul
(one pass for range and codes, none of the separate reductions the symmetric rule needs) where the input
feeds one linear, and into MatMulIntegerToFloat where it feeds several.

Weight codes: onnxruntime's x86 kernel for uint8 x int8 (VPMADDUBSW on AVX2) adds pairs of products in
saturating 16-bit lanes, so int8 weights are exact only while every |code| <= 64 (255 * 64 * 2 < 2^15):
a 7-bit grid (``int7``, what onnxruntime's own ``reduce_range`` does). Such codes are stored as int8 and
take that fast kernel; full 8-bit codes are shifted to uint8 (zero point 128) and take the exact but
~30% slower uint8 x uint8 kernel (measured on this machine's AVX2 CPU).

Per tensor, ``Mul(Cast(acc), Mul(s, w_scale)) + bias`` is the pattern onnxruntime fuses into one
MatMulIntegerToFloat kernel (bias included). Per token the (batch, tokens, 1) scale cannot enter that
kernel: the graph calls com.microsoft MatMulIntegerToFloat with the weight scales and multiplies the rows
by the token scales after it. Linears whose spec has no integer-kernel form (groups, weight-only) stay in
the explicit QDQ form.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from lowbit.export.onnx_graph import GraphEdit
from lowbit.export.onnx_qdq import check_activation_spec, dynamic_asymmetric_codes, dynamic_scale, rows
from lowbit.export.onnx_sites import LinearSite
from lowbit.export.onnx_weights import OnnxWeight
from lowbit.formats.activation import ActivationSpec

ACT_ZERO_POINT = 128
MS_DOMAIN = "com.microsoft"
SATURATION_FREE_MAGNITUDE = 64


def integer_kernel_ready(weight: OnnxWeight, act: ActivationSpec | None) -> bool:
    """Whether this linear can run as MatMulInteger: 8-bit-or-less codes per channel/tensor, int8 inputs."""
    return (act is not None and act.format == "int8" and weight.block_size == 0
            and weight.data_type in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4)
            and (weight.scale.ndim == 0 or weight.axis == 1))


def integer_operands(weight: OnnxWeight) -> tuple[np.ndarray, np.ndarray]:
    """Weight codes and zero point(s) for MatMulInteger, as int8 when that is exact, else as uint8.

    int8 weights take onnxruntime's fast uint8 x int8 kernel, which adds pairs of products in saturating
    16-bit lanes: exact when every |code| <= 64 (255 * 64 * 2 < 2^15), i.e. for 7-bit or smaller grids.
    Full 8-bit codes are shifted to uint8 (zero point 128) for the exact uint8 x uint8 kernel.
    """
    if weight.signed:
        if int(np.abs(weight.codes.astype(np.int16)).max(initial=0)) <= SATURATION_FREE_MAGNITUDE:
            return weight.codes.astype(np.int8), np.array(0, np.int8)
        return (weight.codes.astype(np.int16) + 128).astype(np.uint8), np.array(128, np.uint8)
    zero = np.zeros((), np.uint8) if weight.zero_point is None else weight.zero_point.astype(np.uint8)
    return weight.codes.astype(np.uint8), zero


class Int8Lowering:
    """Rewrites W8A8 linears to integer kernels; linears that read the same input share its quantization."""

    def __init__(self, edit: GraphEdit):
        self.edit = edit
        self._quantized: dict[tuple[str, str], tuple[str, str, str]] = {}

    def linear(self, site: LinearSite, weight: OnnxWeight, act: ActivationSpec, static_scale: float | None = None) -> None:
        """Replace ``site`` by its input's integer codes, the integer product, and float rescaling + bias."""
        check_activation_spec(act, site.module)
        edit, hint = self.edit, site.module
        edit.replace(site.matmul, removed=[site.bias_add] if site.bias_add else [])
        codes, zero = integer_operands(weight)
        w = edit.const(f"{hint}.codes", codes)
        w_zero = edit.const(f"{hint}.zero_point", zero)
        w_scale = edit.const(f"{hint}.scale", weight.scale.astype(np.float32))
        x_codes, x_scale, act_zero = self._quantized_input(site.input, weight.codes.shape[0], act, static_scale, hint)
        if act.granularity == "token":
            # acc * w_scale in the kernel; the per-token scale (batch, tokens, 1) multiplies rows after it.
            one = edit.const(f"{hint}.one", np.array(1.0, np.float32))
            columns = edit.node("MatMulIntegerToFloat", [x_codes, w, one, w_scale, act_zero, w_zero], hint,
                                domain=MS_DOMAIN)
            y = edit.node("Mul", [columns, x_scale], hint)
            edit.same_type(columns, site.output)
            edit.same_type(y, site.output)
        else:
            # Mul(Cast(acc), Mul(s, w_scale)) [+ bias]: the pattern onnxruntime fuses into MatMulIntegerToFloat.
            acc = edit.node("MatMulInteger", [x_codes, w, act_zero, w_zero], hint)
            step = edit.node("Mul", [x_scale, w_scale], hint)
            y = edit.node("Mul", [edit.node("Cast", [acc], hint, to=TensorProto.FLOAT), step], hint)
        if site.bias_init is None:
            edit.node("Identity", [y], hint, outputs=[site.output])
        else:
            edit.node("Add", [y, site.bias_init], hint, outputs=[site.output])

    def _quantized_input(self, x: str, width: int, act: ActivationSpec, static_scale: float | None,
                         hint: str) -> tuple[str, str, str]:
        """(uint8 codes, scale, zero point) of input ``x``, made once per input and spec."""
        key = (x, str(act) if act.dynamic else f"{act}:{static_scale!r}")
        if key not in self._quantized:
            self._quantized[key] = self._quantize(x, width, act, static_scale, hint)
        return self._quantized[key]

    def _quantize(self, x: str, width: int, act: ActivationSpec, static_scale: float | None,
                  hint: str) -> tuple[str, str, str]:
        edit = self.edit
        if not act.symmetric:
            codes, scale, act_zero = dynamic_asymmetric_codes(edit, x, hint)
            return codes, scale, act_zero
        act_zero = edit.const(f"{hint}.act_zero_point", np.array(ACT_ZERO_POINT, np.uint8))
        if act.granularity != "token":
            if act.dynamic:
                scale = dynamic_scale(edit, x, act, hint)
            else:
                scale = edit.const(f"{hint}.act_scale", np.array(static_scale, np.float32))
            return edit.node("QuantizeLinear", [x, scale, act_zero], hint), scale, act_zero
        # Per token: scale (batch, tokens, 1); QuantizeLinear takes a 1-D scale, so quantize the rows of x
        # reshaped to (tokens, width) along axis 0 and give the codes x's shape back.
        scale = dynamic_scale(edit, x, act, hint, keepdims=1, axis=-1)
        scale_1d = edit.node("Reshape", [scale, edit.const(f"{hint}.flat", np.array([-1], np.int64))], hint)
        zeros = edit.node("ConstantOfShape", [edit.node("Shape", [scale_1d], hint)], hint,
                          value=helper.make_tensor("value", TensorProto.UINT8, [1], [ACT_ZERO_POINT]))
        codes_2d = edit.node("QuantizeLinear", [rows(edit, x, width, hint), scale_1d, zeros], hint, axis=0)
        codes = edit.node("Reshape", [codes_2d, edit.node("Shape", [x], hint)], hint)
        edit.same_type(codes, x, TensorProto.UINT8)
        return codes, scale, act_zero
