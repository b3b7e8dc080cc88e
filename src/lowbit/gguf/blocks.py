"""The GGUF block types lowbit writes, one small class each, registered by name when defined.

A block type turns float32 rows into the bytes llama.cpp reads. Types with ``feedback`` expose three steps so the
error-feedback rounding (``lowbit.gguf.feedback``) can interleave them: ``fit`` chooses the stored scales
(optionally weighted by an importance matrix) and returns the resulting :class:`~lowbit.gguf.grid.Grid`;
``Grid.nearest`` rounds onto it (``reference_codes``: ggml's exact rounding); ``pack`` lays header and codes out as llama.cpp's C structs. ``quantize`` does
all three. Decoding always goes through the ``gguf`` package, the consumer's reference decoder.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from lowbit.errors import LowbitError
from lowbit.gguf.grid import F32, Grid

ROW_SLICE_ELEMENTS = 1 << 22  # rows encoded per step: a few tens of MB of float temporaries, whatever the tensor

BLOCK_TYPES: dict[str, type["BlockType"]] = {}


class BlockType:
    """One GGUF tensor type. Subclasses set ``name`` and implement ``quantize`` (or fit/codes/pack)."""

    name: ClassVar[str]
    ggml: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    feedback: ClassVar[bool] = False  # True when quantize_with_feedback works (fit/pack, or encode/repick)
    FEEDBACK_UNIT: ClassVar[int] = 0  # columns feedback decides together; 0: one at a time onto ``fit``'s grid

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:  # an abstract family (e.g. the symmetric 32-value types)
            return
        cls.ggml = GGMLQuantizationType[cls.name]
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[cls.ggml]
        assert cls.name not in BLOCK_TYPES, cls.name
        BLOCK_TYPES[cls.name] = cls

    @classmethod
    def fit(cls, x: np.ndarray, w: np.ndarray | None = None) -> Grid:
        """The grid (stored scales) for blocks ``x`` (n_blocks, block_size); ``w`` weights the error."""
        raise NotImplementedError(f"{cls.name} has no grid for error feedback")

    @classmethod
    def quantize_with_feedback(cls, rows: np.ndarray, hessian: np.ndarray, importance: np.ndarray | None,
                               damp: float) -> np.ndarray:
        """Rows (n, k) -> bytes with GPTQ error feedback through ``hessian`` (k, k): column by column onto the
        grid ``fit`` chooses (``lowbit.gguf.feedback``), or, for the types that decide ``FEEDBACK_UNIT`` columns
        together (lattice and IQ1: ``encode`` / ``repick`` / ``pack_code``), a unit at a time
        (``lowbit.gguf.feedback_lattice``)."""
        if cls.FEEDBACK_UNIT:
            from lowbit.gguf.feedback_lattice import lattice_feedback_quantize

            return lattice_feedback_quantize(rows, hessian, cls, importance, damp=damp)
        from lowbit.gguf.feedback import feedback_quantize

        return feedback_quantize(rows, hessian, cls, importance, damp=damp)

    @classmethod
    def reference_codes(cls, x: np.ndarray, grid: Grid) -> np.ndarray:
        """Codes for ``x`` on a reference (unweighted) grid; types override this with ggml's exact rounding."""
        return grid.nearest(x)

    @classmethod
    def pack(cls, grid: Grid, codes: np.ndarray) -> np.ndarray:
        """The blocks' bytes, (n_blocks, type_size) uint8."""
        raise NotImplementedError

    @classmethod
    def quantize_blocks(cls, x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        """float32 (n_blocks, block_size) -> uint8 (n_blocks, type_size). Without ``w``: llama.cpp's reference."""
        grid = cls.fit(x, w)
        return cls.pack(grid, cls.reference_codes(x, grid) if w is None else grid.nearest(x))

    @classmethod
    def quantize(cls, rows: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        """Rows (n, k) -> bytes (n, k / block_size * type_size); ``w`` is one weight per column (imatrix)."""
        n, k = rows.shape
        if k % cls.block_size:
            raise LowbitError(f"{cls.name} needs rows of a multiple of {cls.block_size} values, got {k}")
        step = max(1, ROW_SLICE_ELEMENTS // k)
        if n > step:  # blocks never cross rows: encode slices of rows to bound the float temporaries
            return np.concatenate([cls.quantize(rows[i:i + step], w) for i in range(0, n, step)])
        x = np.ascontiguousarray(rows, dtype=F32).reshape(-1, cls.block_size)
        wb = None if w is None else np.broadcast_to(np.asarray(w, F32).reshape(1, -1), (n, k)).reshape(-1, cls.block_size)
        return cls.quantize_blocks(x, wb).reshape(n, -1)

    @classmethod
    def dequantize(cls, data: np.ndarray) -> np.ndarray:
        """Bytes (n, row_bytes) -> float32 (n, k) with the gguf package's decoder."""
        return gguf_quants.dequantize(data, cls.ggml)


class F32Type(BlockType):
    name = "F32"

    @classmethod
    def quantize(cls, rows: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        return np.ascontiguousarray(rows, dtype=F32)


class F16Type(BlockType):
    name = "F16"

    @classmethod
    def quantize(cls, rows: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        return np.ascontiguousarray(rows, dtype=F32).astype(np.float16)


class BF16Type(BlockType):
    name = "BF16"

    @classmethod
    def quantize_blocks(cls, x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        """ggml_compute_fp32_to_bf16: NaN made quiet, otherwise round to nearest even on the top 16 bits."""
        n = np.ascontiguousarray(x, dtype=F32).view(np.uint32)
        nan = (n & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        rounded = (n.astype(np.uint64) + np.uint64(0x7FFF) + ((n >> np.uint32(16)) & np.uint32(1))) >> np.uint64(16)
        out = np.where(nan, (n >> np.uint32(16)) | np.uint32(64), rounded).astype(np.uint16)
        return out.view(np.uint8).reshape(x.shape[0], -1)


def get_block_type(name: str) -> type[BlockType]:
    """The block type called ``name`` (case-insensitive), or a one-line error listing the known ones."""
    _load_all()
    cls = BLOCK_TYPES.get(name.upper())
    if cls is None:
        raise LowbitError(f"unknown GGUF tensor type {name!r}; known: {', '.join(BLOCK_TYPES)}")
    return cls


def _load_all() -> None:
    # The modules register their classes on import; importing them here keeps the registry complete.
    from lowbit.gguf import (  # noqa: F401
        iquants, iquants_grid, iquants_iq1, iquants_iq2, kquants, legacy, mxfp4, ternary)
