"""GGUF block types that are exactly a lowbit spec ("twins"), and their bytes straight from a QTensor's codes.

Some GGUF types are one scale per run of values along a row times a small signed integer, which is a lowbit
spec with fp16 scales:

    TQ2_0, TQ1_0  value = d * (q - 1), 256 values per d   ==  ternary:g256      (codes -1..1)
    Q4_0          value = d * (q - 8),  32 values per d   ==  int4:g32 (sym)    (codes -8..7)
    Q8_0          value = d * q,        32 values per d   ==  int8:g32 (sym)    (codes -128..127)

A checkpoint trained or quantized on a twin spec (``lowbit qat --gguf-type TQ2_0`` trains on them) is written to
GGUF without re-quantizing anything: the codes and fp16 scales are laid out as llama.cpp's structs, so the file
computes exactly what the checkpoint computes. ``twin_rules`` gives the recipe that puts every linear on the
twin of the type a GGUF mix plans for it (llama.cpp's fallbacks included), leaving tensors whose type has no
twin (k-quants, float) to the exporter.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lowbit.errors import LowbitError
from lowbit.formats.quantize import dequantize
from lowbit.formats.qtensor import QTensor
from lowbit.formats.spec import parse_spec
from lowbit.gguf.blocks import get_block_type
from lowbit.gguf.grid import F32, Grid

# GGUF type -> (lowbit spec, offset added to a signed code to give the stored code)
TWINS: dict[str, tuple[str, int]] = {
    "TQ2_0": ("ternary:g256", 1),
    "TQ1_0": ("ternary:g256", 1),
    "Q4_0": ("int4:g32", 8),
    "Q8_0": ("int8:g32", 128),
}


def twin_spec(gguf_type: str) -> str | None:
    """The lowbit spec whose grid is exactly ``gguf_type``'s, or None."""
    twin = TWINS.get(gguf_type.upper())
    return None if twin is None else twin[0]


def matches(qt: QTensor, gguf_type: str) -> bool:
    """Whether ``qt`` lies on ``gguf_type``'s grid as is (same format, symmetry, group, fp16 scales)."""
    twin = TWINS.get(gguf_type.upper())
    if twin is None:
        return False
    spec = parse_spec(twin[0])
    s = qt.spec
    return (s.format == spec.format and s.symmetric and qt.zeros is None and s.granularity == "group"
            and s.group_size == spec.group_size and s.scale_dtype == "fp16" and qt.global_scale is None)


def encode_twin(qt: QTensor, gguf_type: str, layout: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The GGUF bytes (rows, row_bytes) of ``qt`` in ``gguf_type``, after ``layout`` (the architecture's row
    re-layout, applied identically to codes and scales). Refuses a tensor that is not on the type's grid."""
    if not matches(qt, gguf_type):
        raise LowbitError(f"a {qt.spec} tensor is not on the {gguf_type} grid (that needs {twin_spec(gguf_type)} "
                          "with fp16 scales)")
    block = get_block_type(gguf_type)
    rows, cols = qt.codes.shape
    if cols % block.block_size:
        raise LowbitError(f"{gguf_type} needs rows of a multiple of {block.block_size} values, got {cols}")
    group = qt.spec.group_size
    codes = layout(qt.codes.numpy().astype(F32))
    scales = layout(np.repeat(qt.scales.float().numpy(), group, axis=1)[:, :cols])
    codes_b = codes.reshape(-1, block.block_size)
    scales_b = scales.reshape(-1, block.block_size)
    if not np.array_equal(scales_b, np.broadcast_to(scales_b[:, :1], scales_b.shape)):
        raise LowbitError(f"the tensor's scales do not line up with {gguf_type}'s blocks after the GGUF re-layout")
    d = scales_b[:, 0].astype(F32)
    stored = (codes_b + TWINS[gguf_type.upper()][1]).astype(np.uint8)
    ds = np.broadcast_to(d[:, None], codes_b.shape)
    grid = Grid(scale=ds, offset=ds * F32(-TWINS[gguf_type.upper()][1]), qmax=int(stored.max(initial=0)),
                header={"d": d})
    return block.pack(grid, stored).reshape(codes.shape[0], -1)


def check_exact(qt: QTensor, gguf_type: str, data: np.ndarray, layout: Callable[[np.ndarray], np.ndarray]) -> None:
    """Decode ``data`` with the gguf package and require it to equal the QTensor's values (after ``layout``)."""
    decoded = get_block_type(gguf_type).dequantize(data).reshape(-1)
    expected = layout(dequantize(qt).numpy().astype(F32)).reshape(-1)
    if not np.array_equal(decoded, expected):
        raise LowbitError(f"internal error: the {gguf_type} bytes do not decode to the checkpoint's values")


def twin_rules(model, gguf_type: str) -> tuple[str, ...]:
    """``module=spec`` rules putting each linear on the twin grid of the type the GGUF mix ``gguf_type`` plans
    for its weight (llama.cpp's per-tensor choices and fallbacks: e.g. TQ2_0 rows that are not a multiple of
    256 fall back to Q4_0, whose twin is int4:g32). Tensors planned as a type without a twin get no rule."""
    from lowbit.gguf.arch import get_architecture
    from lowbit.gguf.convert import plan_shapes, source_module, stored_tensors
    from lowbit.gguf.mixes import get_mix

    mix = get_mix(gguf_type)
    arch = get_architecture(model)
    hp = arch.hparams(model.config)
    stored = stored_tensors(model, arch, hp)
    plan = plan_shapes(mix, {name: tuple(t.shape) for name, _, t in stored}, hp)
    rules = []
    for name, hf_name, tensor in stored:
        module = source_module(hf_name, tensor)
        spec = twin_spec(plan[name].type)
        if module and spec and name != "token_embd.weight":
            rules.append(f"{module}={spec}")
    if not rules:
        raise LowbitError(f"{gguf_type} plans no type lowbit can train for this model's linears "
                          f"(trainable twins: {', '.join(TWINS)})")
    return tuple(rules)
