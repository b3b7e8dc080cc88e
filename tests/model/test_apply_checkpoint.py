"""Applying a recipe to a tiny Llama, writing the checkpoint and reading it back, bit for bit."""

from __future__ import annotations


import pytest
import torch

from lowbit.formats import dequantize, parse_spec
from lowbit.model.apply import plan, quantize_model
from lowbit.model.checkpoint import load_checkpoint, read_qtensors, write_checkpoint
from lowbit.recipe import Recipe, Rule, load_recipe, parse_rule, save_recipe
from tests.conftest import make_tiny_llama


def _recipe(spec="int4:g64:asym", **kw):
    return Recipe(scheme="W4A16", rules=(Rule(("Linear",), parse_spec(spec)),), **kw)


def test_plan_targets_linears_but_not_lm_head():
    model = make_tiny_llama()
    names = [n for n, _, _ in plan(model, _recipe())]
    assert len(names) == 2 * 7
    assert "lm_head" not in names and all("proj" in n for n in names)


def test_rules_first_match_wins_and_ignore_beats_rules():
    model = make_tiny_llama()
    recipe = Recipe(scheme="x", rules=(parse_rule("*.down_proj=int8:channel"), parse_rule("re:.*layers\\.1\\..*=keep"),
                                       Rule(("Linear",), parse_spec("int4:g32"))), ignore=("lm_head", "q_proj"))
    chosen = {n: str(s) for n, _, s in plan(model, recipe)}
    assert chosen["model.layers.0.mlp.down_proj"] == "int8:channel"
    assert chosen["model.layers.1.mlp.down_proj"] == "int8:channel"
    assert "model.layers.1.self_attn.k_proj" not in chosen
    assert "model.layers.0.self_attn.q_proj" not in chosen
    assert chosen["model.layers.0.self_attn.k_proj"] == "int4:g32"


def test_quantized_model_holds_exactly_the_dequantized_weights():
    model = make_tiny_llama()
    qm = quantize_model(model, _recipe(), progress=False)
    for name, qt in qm.qtensors.items():
        assert torch.equal(model.get_parameter(name).data, dequantize(qt))
    # Float tensors (embeddings, norms) are rounded to fp16, and the model computes with exactly those.
    emb = qm.float_tensors["model.embed_tokens.weight"]
    assert emb.dtype == torch.float16
    assert torch.equal(model.model.embed_tokens.weight.data, emb.float())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_nan_weights_are_refused():
    from lowbit.errors import LowbitError

    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(LowbitError, match="model.layers.1.mlp.up_proj.weight has 1 NaN/Inf"):
        quantize_model(model, _recipe(), progress=False)


@pytest.mark.parametrize("spec", ["int4:g64:asym", "int3:g32", "int8:channel", "int2:g64:asym:mse"])
def test_checkpoint_round_trip_is_bit_exact(tmp_path, tiny_llama_dir, spec):
    from transformers import AutoTokenizer

    model = make_tiny_llama()
    qm = quantize_model(model, _recipe(spec), progress=False)
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    write_checkpoint(qm, tmp_path, model.config, tok, {"source": "tiny", "kind": "causal-lm"})
    qtensors, floats = read_qtensors(tmp_path / "model.safetensors")
    assert set(qtensors) == set(qm.qtensors)
    for name, qt in qm.qtensors.items():
        back = qtensors[name]
        assert torch.equal(back.codes, qt.codes) and torch.equal(back.scales, qt.scales)
        assert back.spec == qt.spec and back.shape == qt.shape
        assert (back.zeros is None and qt.zeros is None) or torch.equal(back.zeros, qt.zeros)
    reloaded, _, manifest = load_checkpoint(tmp_path)
    ids = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert manifest["source"] == "tiny"


def test_checkpoint_header_records_specs(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    from lowbit.model.checkpoint import read_header

    model = make_tiny_llama()
    qm = quantize_model(model, _recipe("int3:g64:asym"), progress=False)
    write_checkpoint(qm, tmp_path, model.config, AutoTokenizer.from_pretrained(str(tiny_llama_dir)), {})
    header, meta = read_header(tmp_path / "model.safetensors")
    entry = meta["quantized"]["model.layers.0.mlp.down_proj.weight"]
    assert entry == {"spec": "int3:g64:asym", "shape": [96, 160], "matrix_shape": [96, 160]}
    codes = header["model.layers.0.mlp.down_proj.weight.qcodes"]
    assert codes["dtype"] == "U8" and codes["shape"] == [96 * 160 * 3 // 8]
    assert header["model.layers.0.mlp.down_proj.weight.scales"]["shape"] == [96, 3]


def test_recipe_yaml_round_trip(tmp_path):
    recipe = Recipe(scheme="W4A16", method="rtn", float_dtype="bf16",
                    rules=(parse_rule("*.down_proj=keep"), Rule(("Linear",), parse_spec("int4:g128:asym:mse"))),
                    ignore=("lm_head", "re:.*embed.*"))
    save_recipe(recipe, tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml") == recipe


def test_recipe_rejects_unknown_keys(tmp_path):
    from lowbit.errors import LowbitError

    (tmp_path / "r.yaml").write_text("scheme: W4A16\nrulez: []\n")
    with pytest.raises(LowbitError, match="unknown recipe keys rulez"):
        load_recipe(tmp_path / "r.yaml")
