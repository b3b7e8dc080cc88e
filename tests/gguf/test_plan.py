"""Per-tensor plans: byte costs equal the encoded bytes, the row rule matches each block, explicit plans are
checked with one-line errors, planned tensors match what the exporter writes, and ``dequantized`` is the gguf
package's decoding of the exporter's own bytes."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.gguf.arch import get_architecture
from lowbit.gguf.blocks import BLOCK_TYPES, get_block_type
from lowbit.gguf.convert import FloatTensor, encode_tensor, gguf_tensors, plan_types
from lowbit.gguf.mixes import Choice, get_mix
from lowbit.gguf.plan import (TYPES, allowed_types, checked_types, dequantized, planned_tensors, resolve_plan,
                              tensor_bytes)
from lowbit.model.load import CAUSAL_LM, LoadedModel
from tests.arch_models import DECODERS, lowbit_model

SHAPES = {"blk.0.attn_q.weight": (96, 96), "blk.0.ffn_down.weight": (96, 80), "blk.0.attn_norm.weight": (96,),
          "blk.0.attn_q.bias": (96,), "blk.1.ffn_up.weight": (512, 256)}


def _rows(shape=(4, 512), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * np.linspace(0.2, 3, shape[-1])).astype(np.float32)


def test_types_are_every_block_type_lowbit_writes():
    get_block_type("F32")  # loads the registry
    assert set(TYPES) == set(BLOCK_TYPES)


@pytest.mark.parametrize("type_name", TYPES)
def test_tensor_bytes_equal_the_encoded_bytes(type_name):
    rows = _rows((3, 256))
    assert tensor_bytes(type_name, rows.shape) == get_block_type(type_name).quantize(rows).nbytes


def test_tensor_bytes_by_hand():
    assert tensor_bytes("Q4_K", (2, 256)) == 2 * 144
    assert tensor_bytes("q8_0", (1, 96)) == 3 * 34
    assert tensor_bytes("F16", (4, 32)) == 4 * 32 * 2 and tensor_bytes("F32", (96,)) == 96 * 4
    assert tensor_bytes("TQ1_0", (2, 3, 512)) == 6 * 2 * 54
    with pytest.raises(LowbitError, match="multiple of 256"):
        tensor_bytes("Q6_K", (4, 96))
    with pytest.raises(LowbitError, match="unknown GGUF tensor type"):
        tensor_bytes("Q9_K", (4, 256))


def test_allowed_types_follow_the_row_rule():
    assert allowed_types(80) == ("F32", "F16", "BF16")
    assert allowed_types(96) == ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL", "MXFP4")
    assert allowed_types(512) == TYPES
    assert allowed_types(256, ("q4_k", "Q8_0", "TQ2_0")) == ("Q4_K", "Q8_0", "TQ2_0")
    assert allowed_types(96, ("Q4_K", "Q6_K")) == ()


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_dequantized_is_gguf_decoding_of_the_exporters_bytes(type_name, weighted):
    rows = _rows()
    imp = np.linspace(0.1, 4, rows.shape[1]).astype(np.float32) if weighted else None
    t = FloatTensor("blk.0.ffn_up.weight", rows, "model.layers.0.mlp.up_proj")
    data = encode_tensor(t, Choice(type_name, type_name), "imatrix", {t.name: imp} if weighted else None, None, 0.01)
    expected = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name])
    got = dequantized(type_name, rows, imp)
    assert got.dtype == np.float32 and got.shape == rows.shape
    np.testing.assert_array_equal(got, expected)


def test_dequantized_error_shrinks_with_bits():
    rows = _rows()
    err = {t: float(((dequantized(t, rows) - rows) ** 2).mean()) for t in ("F32", "Q8_0", "Q6_K", "Q4_K", "Q2_K")}
    assert err["F32"] == 0 < err["Q8_0"] < err["Q6_K"] < err["Q4_K"] < err["Q2_K"]


@pytest.mark.parametrize("types,match", [
    ({"blk.9.attn_q.weight": "Q8_0"}, "'blk.9.attn_q.weight', which this model does not store"),
    ({"blk.0.attn_q.weight": "Q9_K"}, "blk.0.attn_q.weight (rows of 96) is given the unknown type 'Q9_K'; "
                                      "allowed: F32, F16, BF16, Q8_0"),
    ({"blk.0.attn_q.weight": "Q4_K"}, "blk.0.attn_q.weight (rows of 96) cannot be Q4_K: its block of 256"),
    ({"blk.0.ffn_down.weight": "Q8_0"}, "allowed: F32, F16, BF16"),
    ({"blk.0.attn_norm.weight": "Q8_0"}, "blk.0.attn_norm.weight (rows of 96) cannot be Q8_0: llama.cpp keeps"),
    ({"blk.0.attn_q.bias": "F16"}, "allowed: F32"),
    ((("blk.0.attn_q.weight", "Q8_0"), ("blk.0.attn_q.weight", "Q4_0")), "two types, Q8_0 and Q4_0"),
])
def test_bad_plans_are_one_line_errors(types, match):
    with pytest.raises(LowbitError) as info:
        checked_types(SHAPES, types)
    assert match in str(info.value) and "\n" not in str(info.value)


def test_resolve_plan_overrides_only_the_named_tensors():
    hp = get_architecture(lowbit_model("llama")).hparams(lowbit_model("llama").config)
    shapes = {k: v for k, v in SHAPES.items() if k != "blk.0.ffn_down.weight"}
    plan = resolve_plan(get_mix("Q4_K_M"), shapes, hp, (("blk.1.ffn_up.weight", "q3_k"), ("blk.0.attn_q.bias", "F32")))
    assert plan["blk.1.ffn_up.weight"] == Choice("Q3_K", "Q3_K")
    assert plan["blk.0.attn_q.weight"] == Choice("Q5_0", "Q4_K")  # the mix's fallback stays
    assert plan["blk.0.attn_norm.weight"] == Choice("F32", "F32")
    # rows of 80 fit no block of Q4_0 (the mix would refuse), but a plan that names the tensor decides for it
    narrow = resolve_plan(get_mix("Q4_0"), {"blk.0.ffn_down.weight": (96, 80)}, hp, {"blk.0.ffn_down.weight": "F16"})
    assert narrow == {"blk.0.ffn_down.weight": Choice("F16", "F16")}


@pytest.mark.parametrize("family", DECODERS)
def test_planned_tensors_are_what_the_exporter_writes(family):
    """Names, order, shapes and choices match ``gguf_tensors``/``plan_types``; each 2-D weight's GGUF rows are
    its module's rows, reordered only for Llama's Q/K permutation."""
    model = lowbit_model(family)
    loaded = LoadedModel(model, None, CAUSAL_LM, "tiny", 0)
    planned = planned_tensors(loaded, "Q4_K_M")
    arch = get_architecture(model)
    hp = arch.hparams(model.config)
    tensors = gguf_tensors(model, arch, hp)
    plan = plan_types(get_mix("Q4_K_M"), tensors, hp)
    assert [p.name for p in planned] == [t.name for t in tensors]
    modules = dict(model.named_modules())
    for p, t in zip(planned, tensors):
        assert (p.shape, p.choice, p.module) == (t.data.shape, plan[t.name], t.module)
        if p.module is None:
            continue
        weight = modules[p.module].weight.detach().numpy()
        if p.name.endswith(("attn_q.weight", "attn_k.weight")) and arch.rules.tensors:
            np.testing.assert_array_equal(np.unique(t.data, axis=0), np.unique(weight, axis=0))  # same rows
            assert not np.array_equal(t.data, weight)
        else:
            np.testing.assert_array_equal(t.data, weight)
    assert "token_embd.weight" in {p.name for p in planned if p.quantizable}
    assert all(p.module is None and not p.quantizable for p in planned if len(p.shape) == 1)
