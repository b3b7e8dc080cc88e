"""Per-tensor GGUF plans: what each tensor costs in each block type, which types its rows admit, which tensors a
model stores (without quantizing anything), and an explicit name -> type plan laid over a mix's choices.

A budgeted allocator (``lowbit.analysis``) enumerates ``planned_tensors``, prices candidates with
``tensor_bytes`` (plus ``lowbit.export.gguf.overhead_bytes`` for the rest of the file), measures their error
with ``dequantized``, and hands its choice to the exporter as ``GGUFExportOptions.types``, which
``checked_types`` checks the way llama.cpp would: a block must divide the row, norms and 1-D tensors stay F32.

Shapes are numpy/torch order, ``(rows, ne0)``: the last dimension is llama.cpp's row length ``ne0``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.errors import LowbitError
from lowbit.gguf.arch import HParams, get_architecture
from lowbit.gguf.blocks import get_block_type
from lowbit.gguf.convert import plan_shapes, source_module, stored_tensors
from lowbit.gguf.mixes import Choice, Mix, get_mix, is_quantizable
from lowbit.model.load import LoadedModel

# Every block type lowbit writes, from most to fewest bits per weight (the default candidates).
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_1", "Q5_K", "Q5_0", "Q4_1", "Q4_K", "Q4_0", "IQ4_NL", "IQ4_XS",
         "MXFP4", "Q3_K", "IQ3_S", "IQ3_XXS", "Q2_K", "IQ2_S", "IQ2_XS", "IQ2_XXS", "TQ2_0", "IQ1_M", "TQ1_0", "IQ1_S")
KEEP_F32 = ("F32",)  # what a norm, bias or other 1-D tensor may be


class PlannedTensor(NamedTuple):
    """One tensor the file stores: GGUF name, the HF module its weight comes from (``model.embed_tokens`` for
    ``token_embd``; None for 1-D tensors), shape (rows, ne0), and the base mix's choice (or the explicit one)."""

    name: str
    module: str | None
    shape: tuple[int, ...]
    choice: Choice

    @property
    def quantizable(self) -> bool:
        """Whether llama.cpp would quantize it (2-D weights except norms and position embeddings)."""
        return is_quantizable(self.name, len(self.shape))


def _sizes(type_name: str) -> tuple[int, int]:
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    except KeyError:
        raise LowbitError(f"unknown GGUF tensor type {type_name!r}; known: {', '.join(TYPES)}") from None


def tensor_bytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Exact bytes of a tensor of ``shape`` (rows, ne0) in ``type_name`` (alignment padding not included):
    rows * ne0 / block_size * type_size, which for F32/F16/BF16 is elements * element size."""
    block, size = _sizes(type_name)
    ne0 = shape[-1]
    if ne0 % block:
        raise LowbitError(f"{type_name} needs rows of a multiple of {block} values, got {ne0}")
    return math.prod(shape[:-1]) * (ne0 // block) * size


def allowed_types(ne0: int, candidates: Iterable[str] = TYPES) -> tuple[str, ...]:
    """The ``candidates`` (in their order, upper-cased) whose block divides a row of ``ne0`` values: llama.cpp
    refuses a tensor whose ``ne0`` is not a multiple of its type's block size."""
    return tuple(t.upper() for t in candidates if ne0 % _sizes(t)[0] == 0)


def _check(name: str, shape: tuple[int, ...], type_name: str) -> str:
    """The upper-cased ``type_name`` if tensor ``name`` of ``shape`` may have it, else a one-line error."""
    quantizable = is_quantizable(name, len(shape))
    allowed = allowed_types(shape[-1]) if quantizable else KEEP_F32
    where = f"GGUF plan: {name} (rows of {shape[-1]})"
    if type_name.upper() not in TYPES:
        raise LowbitError(f"{where} is given the unknown type {type_name!r}; allowed: {', '.join(allowed)}")
    if not quantizable and type_name.upper() not in KEEP_F32:
        raise LowbitError(f"{where} cannot be {type_name}: llama.cpp keeps norms, biases, position "
                          "embeddings and 1-D tensors F32; "
                          f"allowed: {', '.join(allowed)}")
    if type_name.upper() not in allowed:
        raise LowbitError(f"{where} cannot be {type_name}: its block of {_sizes(type_name)[0]} does not divide "
                          f"the row; allowed: {', '.join(allowed)}")
    return type_name.upper()


def checked_types(shapes: Mapping[str, tuple[int, ...]],
                  types: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """An explicit plan (tensor name -> type, or pairs) checked against the model's tensors (``shapes``, name ->
    (rows, ne0)) the way llama.cpp would load it: the name must be a stored tensor, the type known, its block
    must divide the row, and tensors llama.cpp keeps F32 (norms, biases, 1-D) stay F32. Returns the upper-cased
    plan; any problem is a one-line error naming the tensor and its allowed types."""
    given: dict[str, str] = {}
    for name, type_name in list(types.items() if isinstance(types, Mapping) else types):
        if name not in shapes:
            examples = [n for n in shapes if is_quantizable(n, len(shapes[n]))][:4]
            raise LowbitError(f"GGUF plan names {name!r}, which this model does not store; its tensors are "
                              f"named like {', '.join(examples)} ({len(shapes)} in all)")
        checked = _check(name, tuple(shapes[name]), str(type_name))
        if given.get(name, checked) != checked:
            raise LowbitError(f"GGUF plan gives {name} two types, {given[name]} and {checked}; keep one")
        given[name] = checked
    return given


def resolve_plan(mix: Mix, shapes: Mapping[str, tuple[int, ...]], hp: HParams,
                 types: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> dict[str, Choice]:
    """Each tensor's type: the explicit plan's where it names the tensor (checked by ``checked_types`` first),
    else the mix's choice with llama.cpp's fallbacks (``plan_shapes``). In ``shapes`` order."""
    given = checked_types(shapes, types)
    mixed = plan_shapes(mix, {n: s for n, s in shapes.items() if n not in given}, hp)
    return {n: Choice(given[n], given[n]) if n in given else mixed[n] for n in shapes}


def planned_tensors(loaded: LoadedModel, mix: Mix | str = "Q4_K_M",
                    types: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> list[PlannedTensor]:
    """Every tensor the exporter would write for ``loaded`` under ``mix`` (and an optional explicit plan), in
    file order, with shapes and types but no quantization and no float copies of the weights.

    A 2-D weight's GGUF data is its module's ``weight`` ([out, in]) with at most its rows reordered: the only
    re-layout of 2-D weights is Llama's Q/K row permutation (``arch.llama_permute``), so per-row errors and
    sizes measured on the module's weight hold for the GGUF tensor."""
    mix = get_mix(mix) if isinstance(mix, str) else mix
    arch = get_architecture(loaded.model)
    hp = arch.hparams(loaded.model.config)
    stored = stored_tensors(loaded.model, arch, hp)
    shapes = {name: tuple(tensor.shape) for name, _, tensor in stored}
    plan = resolve_plan(mix, shapes, hp, types)
    return [PlannedTensor(name, source_module(hf_name, tensor), shapes[name], plan[name])
            for name, hf_name, tensor in stored]


def dequantized(type_name: str, data: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 rows (n, ne0) quantized to ``type_name`` by lowbit (importance-weighted when ``importance``, one
    weight per column, is given, as the exporter's imatrix path does) and decoded back to float32 by the gguf
    package's reference dequantizer: what llama.cpp will compute with, to measure a candidate type's error."""
    block = get_block_type(type_name)
    rows = np.ascontiguousarray(data, dtype=np.float32)
    rows = rows.reshape(1, -1) if rows.ndim == 1 else rows
    return block.dequantize(block.quantize(rows, importance)).reshape(np.shape(data))
