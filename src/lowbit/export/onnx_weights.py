"""A QTensor as the operands of ONNX DequantizeLinear: codes, scales, zero points, axis and block size.

DequantizeLinear computes ``(codes - zero_point) * scale`` in float32, which is exactly what
``lowbit.formats.quantize.dequantize`` computes, so the graph holds bit for bit the weights lowbit
evaluated. Linear weights are stored transposed ([in, out], MatMul's right operand); embedding tables
as they are ([vocab, dim]). Codes of 4 bits or fewer use ONNX's 4-bit types (opset 21), others 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from lowbit.errors import LowbitError
from lowbit.formats.integer import IntegerFormat
from lowbit.formats.qtensor import QTensor
from lowbit.formats.registry import get_format
from lowbit.formats.scales import scale_values


@dataclass(frozen=True)
class OnnxWeight:
    """DequantizeLinear operands for one weight. ``scale``/``zero_point`` are 0-D (per tensor), 1-D along
    ``axis`` (per channel) or blocked along ``axis`` with ``block_size`` (groups)."""

    codes: np.ndarray
    data_type: int
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int
    block_size: int = 0

    @property
    def signed(self) -> bool:
        return self.codes.dtype == np.int8 or np.issubdtype(self.codes.dtype, np.signedinteger)

    def dequantize(self) -> np.ndarray:
        """What DequantizeLinear computes (for tests and checks)."""
        zero = 0.0 if self.zero_point is None else self._expand(self.zero_point.astype(np.float32))
        return (self.codes.astype(np.float32) - zero) * self._expand(self.scale)

    def _expand(self, values: np.ndarray) -> np.ndarray:
        if values.ndim == 0:
            return values
        if self.block_size:
            values = np.repeat(values, self.block_size, axis=self.axis)
            index = [slice(None)] * self.codes.ndim
            index[self.axis] = slice(0, self.codes.shape[self.axis])
            return values[tuple(index)]
        shape = [1] * self.codes.ndim
        shape[self.axis] = -1
        return values.reshape(shape)


def onnx_weight(q: QTensor, transpose: bool, name: str = "tensor") -> OnnxWeight:
    """DequantizeLinear operands for ``q`` (a 2-D integer QTensor); ``transpose`` for MatMul's [in, out]."""
    fmt = get_format(q.spec.format)
    if not isinstance(fmt, IntegerFormat) or q.global_scale is not None or len(q.shape) != 2:
        raise LowbitError(f"{name}: ONNX export writes 2-D integer specs (int2..int8), not {q.spec}; "
                          "keep this module in float (--keep) or choose an int spec")
    if q.spec.granularity == "block":
        raise LowbitError(f"{name}: ONNX DequantizeLinear has no 2-D blocks ({q.spec}); use groups (g<N>) or channels")
    signed = q.spec.codes_signed
    small = fmt.bits <= 4
    data_type = {(True, True): TensorProto.INT4, (True, False): TensorProto.UINT4,
                 (False, True): TensorProto.INT8, (False, False): TensorProto.UINT8}[(small, signed)]
    numpy_type = np.int8 if signed else np.uint8
    codes = q.codes.numpy().astype(numpy_type)
    steps = scale_values(q.scales, None).float().numpy().astype(np.float32)
    zeros = None if q.zeros is None else q.zeros.numpy().astype(numpy_type)
    if transpose:
        codes, steps = codes.T, steps.T
        zeros = None if zeros is None else zeros.T
    row_axis, col_axis = (1, 0) if transpose else (0, 1)
    if q.spec.granularity == "tensor":
        scale, zero, axis, block = steps.reshape(()), None if zeros is None else zeros.reshape(()), 0, 0
    elif q.spec.granularity == "channel":
        scale, zero, axis, block = steps.reshape(-1), None if zeros is None else zeros.reshape(-1), row_axis, 0
    else:
        scale, zero, axis, block = steps, zeros, col_axis, q.spec.group_size
    return OnnxWeight(np.ascontiguousarray(codes), data_type, np.ascontiguousarray(scale),
                      None if zero is None else np.ascontiguousarray(zero), axis, block)
