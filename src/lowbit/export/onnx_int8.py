"""Quantized linears as integer matrix products that onnxruntime's CPU provider runs on int8 kernels.

A W8A8 linear (integer weights per channel or per tensor, int8 activations) becomes

    codes = QuantizeLinear(x, s, 128)             uint8, s = max|x| / 127.5 per token or per tensor
    acc   = MatMulInteger(codes, W_codes, 128, w_zero)              int32, exact
    y     = float(acc) * s * w_scale + bias

which equals lowbit's fake-quant model: same scales, round-half-even, clamp to [-128, 127]. An asymmetric
per-tensor input (``int8:tensor:dynamic:asym``) takes its codes, scale and zero point from one
DynamicQuantizeLinear instead; onnxruntime fuses that node with the product into DynamicQuantizeMatMul
(one pass for range and codes, none of the separate reductions the symmetric rule needs).

Linears that read the same input with the same input spec (attention's q, k and v; an MLP's gate and up)
share its codes. With ``fuse`` they also run as ONE product over their weights side by side, then a Split
gives each its columns: every column is computed exactly as in its own product (same integer sums, same
scales). Each module keeps its own named constants in the file; Concat nodes join them (onnxruntime folds
those at load), and a joined product's weight zero points are per column. Off by default: for batches of
tokens the joined product saves onnxruntime little (one MiniLM layer, 32 x 128 tokens, two threads: 7.3 ms
of kernel time against 7.7 ms for q, k, v and their shared DynamicQuantizeLinear) and its Split, a
single-threaded copy of every column, costs 2.5 ms; it only pays for a few tokens per call (decoding).

Weight codes: onnxruntime's x86 kernel for uint8 x int8 (VPMADDUBSW on AVX2) adds pairs of products in
saturating 16-bit lanes, so int8 weights are exact only while every |code| <= 64 (255 * 64 * 2 < 2^15):
a 7-bit grid (``int7``, what onnxruntime's own ``reduce_range`` does). Such codes are stored as int8 and
take that fast kernel; full 8-bit codes are shifted to uint8 (zero point 128) and take the exact but
~30% slower uint8 x uint8 kernel (measured on this machine's AVX2 CPU).

Per tensor, ``Mul(Cast(acc), Mul(s, w_scale)) + bias`` is the pattern onnxruntime fuses into one
MatMulIntegerToFloat kernel (bias included). Per token the (batch, tokens, 1) scale cannot enter that
kernel's epilogue: the graph calls com.microsoft MatMulIntegerToFloat with the weight scales and multiplies
the rows by the token scales after it (a parallel Mul; onnxruntime 1.32 would also take the token scales as
the kernel's A scale, but then scales the rows in one thread, and adds its bias input before that), then adds
the bias (see ``_bias``). The codes come from one blocked QuantizeLinear (a block = a token's row). Linears
whose spec has no integer-kernel form (groups, weight-only) stay in the explicit QDQ form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from lowbit.export.onnx_graph import GraphEdit
from lowbit.export.onnx_qdq import check_activation_spec, dynamic_asymmetric_codes, dynamic_scale
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


def saturation_free(codes: np.ndarray) -> bool:
    """Whether signed codes can be stored as int8 for the fast uint8 x int8 kernel without saturating it."""
    return int(np.abs(codes.astype(np.int16)).max(initial=0)) <= SATURATION_FREE_MAGNITUDE


def signed_kernel_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed weight codes and zero point for an integer kernel: int8 (zero point 0) when that is exact on
    every x86 CPU, else shifted to uint8 with zero point 128 (the same values, the exact uint8 x uint8 kernel)."""
    if saturation_free(codes):
        return codes.astype(np.int8), np.array(0, np.int8)
    return (codes.astype(np.int16) + 128).astype(np.uint8), np.array(128, np.uint8)


def fast_int8_codes(weight: OnnxWeight) -> bool:
    """Whether the codes can be stored as int8 for the fast uint8 x int8 kernel without saturating it."""
    return weight.signed and saturation_free(weight.codes)


def integer_operands(weight: OnnxWeight) -> tuple[np.ndarray, np.ndarray]:
    """Weight codes and zero point(s) for MatMulInteger, as int8 when that is exact, else as uint8.

    int8 weights take onnxruntime's fast uint8 x int8 kernel, which adds pairs of products in saturating
    16-bit lanes: exact when every |code| <= 64 (255 * 64 * 2 < 2^15), i.e. for 7-bit or smaller grids.
    Full 8-bit codes are shifted to uint8 (zero point 128) for the exact uint8 x uint8 kernel.
    """
    if weight.signed:
        return signed_kernel_codes(weight.codes)
    zero = np.zeros((), np.uint8) if weight.zero_point is None else weight.zero_point.astype(np.uint8)
    return weight.codes.astype(np.uint8), zero


@dataclass(frozen=True)
class IntegerLinear:
    """One linear to run on an integer kernel: where it is in the graph, its weight, and its input spec."""

    site: LinearSite
    weight: OnnxWeight
    act: ActivationSpec
    static_scale: float | None = None

    @property
    def input_key(self) -> tuple[str, str]:
        """Equal for linears that read the same tensor quantized the same way (they share its codes)."""
        spec = str(self.act) if self.act.dynamic else f"{self.act}:{self.static_scale!r}"
        return self.site.input, spec


def shared_input_groups(linears: list[IntegerLinear]) -> list[list[IntegerLinear]]:
    """The linears that can run as one product: same input key and same weight operand type (int8 codes
    and uint8 codes take different kernels). Groups in order of their first linear, members in given order."""
    groups: dict[tuple, list[IntegerLinear]] = {}
    for linear in linears:
        groups.setdefault((*linear.input_key, fast_int8_codes(linear.weight)), []).append(linear)
    return list(groups.values())


class Int8Lowering:
    """Rewrites W8A8 linears to integer kernels; linears that read the same input share its quantization
    and, with ``fuse``, one product over their joined weights."""

    def __init__(self, edit: GraphEdit, fuse: bool = False):
        self.edit = edit
        self.fuse = fuse
        self._quantized: dict[tuple[str, str], tuple[str, str, str]] = {}

    def lower(self, linears: list[IntegerLinear]) -> None:
        """Rewrite ``linears`` (in graph order, so that shared nodes come before all of their users)."""
        for linear in linears:
            check_activation_spec(linear.act, linear.site.module)
        for group in shared_input_groups(linears) if self.fuse else [[linear] for linear in linears]:
            self._product(group)

    def _product(self, group: list[IntegerLinear]) -> None:
        """Replace the group's MatMuls (and bias Adds) by one integer product whose columns are their outputs."""
        edit, first = self.edit, group[0]
        hint = "+".join(linear.site.module for linear in group)
        sites = [linear.site for linear in group]
        edit.replace(first.site.matmul, removed=[s.matmul for s in sites[1:]] + [s.bias_add for s in sites if s.bias_add])
        token = first.act.granularity == "token"
        y = self._scaled_product(group, hint)
        bias = self._bias(group, row=token)
        if len(group) == 1:
            edit.node("Identity" if bias is None else "Add", [y] if bias is None else [y, bias], hint,
                      outputs=[first.site.output])
            return
        if bias is not None:
            y = edit.node("Add", [y, bias], hint)
        widths = edit.const(f"{hint}.widths", np.array([linear.weight.codes.shape[1] for linear in group], np.int64))
        edit.node("Split", [y, widths], hint, outputs=[s.output for s in sites], axis=-1)

    def _scaled_product(self, group: list[IntegerLinear], hint: str) -> str:
        """The float product of the group's input codes and weight codes, times both scales (no bias yet)."""
        edit, first = self.edit, group[0]
        w, w_zero, w_scale = self._weights(group)
        x_codes, x_scale, act_zero = self._quantized_input(first, hint)
        if first.act.granularity != "token":
            # Mul(Cast(acc), Mul(s, w_scale)) [+ bias]: the pattern onnxruntime fuses into MatMulIntegerToFloat.
            acc = edit.node("MatMulInteger", [x_codes, w, act_zero, w_zero], hint)
            step = edit.node("Mul", [x_scale, w_scale], hint)
            return edit.node("Mul", [edit.node("Cast", [acc], hint, to=TensorProto.FLOAT), step], hint)
        # acc * w_scale in the kernel; the per-token scales (batch, tokens, 1) multiply the rows after it.
        one = edit.const(f"{hint}.one", np.array(1.0, np.float32))
        columns = edit.node("MatMulIntegerToFloat", [x_codes, w, one, w_scale, act_zero, w_zero], hint,
                            domain=MS_DOMAIN)
        y = edit.node("Mul", [columns, x_scale], hint)
        if len(group) == 1:
            edit.same_type(columns, first.site.output)
            edit.same_type(y, first.site.output)
        return y

    def _weights(self, group: list[IntegerLinear]) -> tuple[str, str, str]:
        """(codes, zero point, scale) of the product: one module's constants, or each module's joined by Concat.

        Joined, per-tensor scales and zero points are repeated per column, so that every column keeps its own.
        """
        edit = self.edit
        parts = []
        for linear in group:
            codes, zero = integer_operands(linear.weight)
            scale = linear.weight.scale.astype(np.float32)
            if len(group) > 1:
                columns = codes.shape[1]
                zero = np.ascontiguousarray(np.broadcast_to(zero, (columns,)))
                scale = np.ascontiguousarray(np.broadcast_to(scale, (columns,)))
            module = linear.site.module
            parts.append((edit.const(f"{module}.codes", codes), edit.const(f"{module}.zero_point", zero),
                          edit.const(f"{module}.scale", scale)))
        if len(group) == 1:
            return parts[0]
        hint = "+".join(linear.site.module for linear in group)
        codes, zeros, scales = zip(*parts)
        return (edit.node("Concat", list(codes), f"{hint}/codes", axis=1),
                edit.node("Concat", list(zeros), f"{hint}/zero_point", axis=0),
                edit.node("Concat", list(scales), f"{hint}/scale", axis=0))

    def _bias(self, group: list[IntegerLinear], row: bool) -> str | None:
        """The bias to add after the product (None when no module has one): the module's own, or each module's
        (zeros where it has none) joined by Concat. ``row`` stores it as a (1, columns) row, which keeps
        onnxruntime from fusing its Add with a following Gelu into BiasGelu (it fuses 1-D biases only): after a
        per-token product, Mul + BiasGelu measured slower than Mul + Add + Gelu on 32 x 128 x 1536 values
        (10.2 vs 9.2 ms on two threads, 21.8 vs 18.6 on one)."""
        if all(linear.site.bias_init is None for linear in group):
            return None
        if len(group) == 1 and not row:
            return group[0].site.bias_init
        parts = []
        for linear in group:
            columns = linear.weight.codes.shape[1]
            bias = np.zeros(columns, np.float32) if linear.site.bias is None else linear.site.bias.astype(np.float32)
            parts.append(self.edit.const(f"{linear.site.module}.bias", bias.reshape(1, columns) if row else bias))
        if len(parts) == 1:
            return parts[0]
        return self.edit.node("Concat", parts, "+".join(linear.site.module for linear in group) + "/bias", axis=-1)

    def _quantized_input(self, linear: IntegerLinear, hint: str) -> tuple[str, str, str]:
        """(uint8 codes, scale, zero point) of the linear's input, made once per input and spec."""
        key = linear.input_key
        if key not in self._quantized:
            self._quantized[key] = self._quantize(linear, hint)
        return self._quantized[key]

    def _quantize(self, linear: IntegerLinear, hint: str) -> tuple[str, str, str]:
        edit, x, act = self.edit, linear.site.input, linear.act
        if not act.symmetric:
            codes, scale, act_zero = dynamic_asymmetric_codes(edit, x, hint)
            return codes, scale, act_zero
        if act.granularity != "token":
            act_zero = edit.const(f"{hint}.act_zero_point", np.array(ACT_ZERO_POINT, np.uint8))
            if act.dynamic:
                scale = dynamic_scale(edit, x, act, hint)
            else:
                scale = edit.const(f"{hint}.act_scale", np.array(linear.static_scale, np.float32))
            return edit.node("QuantizeLinear", [x, scale, act_zero], hint), scale, act_zero
        # Per token: scale (batch, tokens, 1), one block of QuantizeLinear per token's row (the blocked form
        # runs ~2x faster in onnxruntime than a per-axis one over x reshaped to rows); the zero points
        # must have the scale's shape.
        width = linear.weight.codes.shape[0]
        scale = dynamic_scale(edit, x, act, hint, keepdims=1, axis=-1)
        zeros = edit.node("ConstantOfShape", [edit.node("Shape", [scale], hint)], hint,
                          value=helper.make_tensor("value", TensorProto.UINT8, [1], [ACT_ZERO_POINT]))
        codes = edit.node("QuantizeLinear", [x, scale, zeros], hint, axis=-1, block_size=width)
        edit.same_type(codes, x, TensorProto.UINT8)
        act_zero = edit.const(f"{hint}.act_zero_point", np.array(ACT_ZERO_POINT, np.uint8))
        return codes, scale, act_zero
