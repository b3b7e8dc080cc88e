"""Sizes before anything is written: what a recipe will store, and what a llama.cpp GGUF mix of the same model
stores. Both from parameter shapes only (works on a meta-device model), so they cost nothing.

Why: the rule "a 4-bit output is never larger than a 4-bit GGUF of the same model" is checked before writing
(``lowbit.model.embeddings`` steps the default embedding spec down when int8 would break it) and reported after.
The GGUF side counts tensor data only (no tokenizer or metadata), with the types our GGUF planner
(``lowbit.gguf.mixes.choose_type``: llama.cpp's choices and fallbacks) gives each tensor, so it is a lower bound
on the real file.
"""

from __future__ import annotations

import math

from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.spec import QuantSpec
from lowbit.recipe import Recipe

FLOAT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
SCALE_BITS = {"fp16": 16, "bf16": 16, "fp32": 32, "e4m3": 8, "e8m0": 8}


def spec_bytes(spec: QuantSpec, rows: int, cols: int) -> int:
    """Bytes of codes, scales, zero points and global scale of a (rows, cols) tensor under ``spec``."""
    block_rows, block_cols = spec.block_size(rows, cols)
    blocks = math.ceil(rows / block_rows) * math.ceil(cols / block_cols)
    bits = rows * cols * spec.bits + blocks * SCALE_BITS[spec.scale_dtype]
    if not spec.symmetric:
        bits += blocks * spec.bits
    if spec.scale_dtype == "e4m3":
        bits += 32
    return math.ceil(bits / 8)


def recipe_bytes(model: nn.Module, recipe: Recipe) -> int:
    """Bytes of tensor data ``recipe`` writes for ``model``: planned weights quantized, the rest in float."""
    from lowbit.model.apply import plan

    quantized = 0
    done: set[int] = set()
    for _, module, spec in plan(model, recipe):
        w = module.weight
        rows, cols = w.shape[0], w[0].numel()
        quantized += spec_bytes(spec, rows, cols)
        done.add(id(w))
    floats = sum(p.numel() for p in model.parameters() if id(p) not in done) * FLOAT_BYTES[recipe.float_dtype]
    return quantized + floats


def gguf_bytes(model: nn.Module, mix_name: str = "Q4_K_M") -> dict | None:
    """Tensor bytes and per-type counts of ``model`` as a GGUF of ``mix_name`` (None when lowbit's
    architecture table has no GGUF name for this family, or a tensor fits no type)."""
    from gguf import GGML_QUANT_SIZES, MODEL_ARCH, GGMLQuantizationType, get_tensor_name_map

    from lowbit.arch import family_of
    from lowbit.gguf.arch import layer_of
    from lowbit.gguf.mixes import TensorRole, choose_type, get_mix

    family, config = family_of(model), getattr(model, "config", None)
    if family is None or family.gguf_arch is None or config is None:
        return None
    n_layers = int(config.num_hidden_layers)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    n_gqa = heads // int(getattr(config, "num_key_value_heads", None) or heads)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    names = get_tensor_name_map(MODEL_ARCH[family.gguf_arch], n_layers)
    mix = get_mix(mix_name)
    total, types = 0, {}
    for hf_name, p in model.named_parameters():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias")) or hf_name
        role = TensorRole(name, int(p.shape[-1]), p.dim(), layer_of(name), n_layers, n_gqa, tied)
        try:
            kind = choose_type(mix, role).type
        except LowbitError:
            return None
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
        total += p.numel() // block * size
        types[kind] = types.get(kind, 0) + 1
    return {"type": mix.name, "bytes": total, "tensor_types": types}
