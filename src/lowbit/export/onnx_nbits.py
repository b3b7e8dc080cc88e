"""Weight-only integer linears as onnxruntime's ``MatMulNBits`` (com.microsoft), its 2/4/8-bit kernel.

``Y = A @ dequant(B)^T`` where, for a weight of N output rows and K inputs in blocks of ``block_size``
along K (a power of two, at least 16; ``k_blocks = ceil(K / block_size)``):
- ``B`` uint8 [N, k_blocks, block_size * bits / 8]: each block's unsigned codes packed low bits first;
- ``scales`` float32 [N * k_blocks];
- ``zero_points`` uint8 [N * ceil(k_blocks * bits / 8)]: each row's block zero points packed low bits first
  (a row starts on a byte boundary); absent means 2^(bits-1).
An element is ``(code - zero_point) * scale``, which is lowbit's dequantization once symmetric (signed)
codes are offset by 2^(bits-1), so the kernel computes with exactly the weights lowbit evaluated. A row's
last, shorter group (K = 576 in groups of 128) is the kernel's padded last block: the padding holds the
zero point, so it adds nothing.

``accuracy_level`` is the kernel's compute type: 0 computes in float with exactly these weights; 4 (the
exporters' default) quantizes the activations to int8 per block inside the kernel (faster, no longer exactly
what lowbit evaluated). onnxruntime's own fusion of DequantizeLinear + MatMul into MatMulNBits uses 4 unless the
session sets ``session.qdq_matmulnbits_accuracy_level``.
"""

from __future__ import annotations

import numpy as np

from lowbit.export.onnx_graph import GraphEdit
from lowbit.export.onnx_sites import LinearSite
from lowbit.formats.integer import IntegerFormat
from lowbit.formats.qtensor import QTensor
from lowbit.formats.registry import get_format
from lowbit.formats.scales import scale_values

MS_DOMAIN = "com.microsoft"
NBITS = (2, 4, 8)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def nbits_ready(q: QTensor, has_input_quantizer: bool) -> bool:
    """Whether MatMulNBits holds this weight exactly: a 2-D weight-only int2/int4/int8 spec in groups of a
    power of two >= 16 (or per channel with K a power of two >= 16), float scales."""
    spec = q.spec
    if has_input_quantizer or len(q.shape) != 2 or q.global_scale is not None:
        return False
    if not isinstance(get_format(spec.format), IntegerFormat) or spec.bits not in NBITS:
        return False
    if spec.scale_dtype not in ("fp16", "bf16", "fp32"):
        return False
    block = block_size_of(q)
    return block >= 16 and block & (block - 1) == 0


def block_size_of(q: QTensor) -> int:
    """MatMulNBits' block_size for this weight (0 when its granularity has no such form)."""
    if q.spec.granularity == "group":
        return q.spec.group_size
    if q.spec.granularity == "channel":
        return q.shape[1]
    return 0


def pack_low_first(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of unsigned ``bits``-bit values into bytes, the first value in the lowest bits."""
    per_byte = 8 // bits
    pad = (-values.shape[-1]) % per_byte
    if pad:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], pad), values.dtype)], axis=-1)
    grouped = values.astype(np.uint8).reshape(*values.shape[:-1], -1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


def nbits_operands(q: QTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B, scales, zero_points) of ``q`` in MatMulNBits' layout (zero_points None when symmetric)."""
    bits, block = q.spec.bits, block_size_of(q)
    n, k = q.shape
    k_blocks = -(-k // block)
    offset = 2 ** (bits - 1) if q.spec.codes_signed else 0
    codes = q.codes.numpy().astype(np.int32) + offset
    zeros = None if q.zeros is None else q.zeros.numpy().astype(np.int32).reshape(n, -1)
    padded = np.empty((n, k_blocks * block), np.int32)
    padded[:, :k] = codes
    if k_blocks * block > k:  # the last block's padding holds the zero point: it dequantizes to 0
        padded[:, k:] = offset if zeros is None else zeros[:, -1:]
    b = pack_low_first(padded.reshape(n, k_blocks, block), bits)
    steps = scale_values(q.scales, None).float().numpy().astype(np.float32).reshape(n, k_blocks)
    zero_points = None if zeros is None else pack_low_first(zeros, bits).reshape(-1)
    return np.ascontiguousarray(b), np.ascontiguousarray(steps.reshape(-1)), zero_points


def nbits_linear(edit: GraphEdit, site: LinearSite, q: QTensor, accuracy_level: int = 0) -> None:
    """Replace ``site`` by one MatMulNBits node (with the bias as its sixth input, after g_idx, if any)."""
    b, scales, zero_points = nbits_operands(q)
    n, k = q.shape
    hint = site.module
    edit.replace(site.matmul, removed=[site.bias_add] if site.bias_add else [])
    inputs = [site.input, edit.const(f"{hint}.qweight", b), edit.const(f"{hint}.scales", scales)]
    inputs.append(edit.const(f"{hint}.zero_points", zero_points) if zero_points is not None else "")
    inputs.append("")  # g_idx (deprecated; the blocks are in order)
    if site.bias_init is not None:
        inputs.append(site.bias_init)
    while inputs[-1] == "":
        inputs.pop()
    edit.node("MatMulNBits", inputs, hint, outputs=[site.output], domain=MS_DOMAIN, K=k, N=n, bits=q.spec.bits,
              block_size=block_size_of(q), accuracy_level=accuracy_level)
    edit.same_type(site.output, site.output)
