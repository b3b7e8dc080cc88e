"""Token embeddings and output heads: the default rule, the flags, tied storage, and the size rule (a 4-bit output
is never larger than the Q4_K_M GGUF of the same model) on tiny models whose vocabulary dominates."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval.estimate import gguf_bytes, recipe_bytes
from lowbit.formats import dequantize
from lowbit.model.apply import plan, quantize_model
from lowbit.model.checkpoint import load_checkpoint, read_qtensors, write_checkpoint
from lowbit.model.embeddings import HeadOptions, embedding_share, plan_embeddings
from lowbit.recipe import load_recipe, save_recipe
from lowbit.workflow import QuantizeOptions, build_recipe
from lowbit.workflow_report import plan_heads
from tests.arch_models import save_tiny, tiny_model
from tests.conftest import make_tiny_llama, make_tokenizer


def _w4(**kw):
    return build_recipe(QuantizeOptions(**kw))


def _planned(model, recipe) -> dict[str, str]:
    return {name: str(spec) for name, _, spec in plan(model, recipe)}


def test_default_is_int8_per_row_above_20_percent_and_keep_below():
    big = make_tiny_llama()  # 512 x 96 embedding: 25% of the weights
    heads = plan_embeddings(_w4(), big, HeadOptions())
    assert embedding_share(big) == pytest.approx(0.2494, abs=1e-3)
    first = heads.recipe.rules[0]
    assert first.targets == ("model.embed_tokens",) and str(first.spec) == "int8:channel"
    assert heads.embedding_reason == "default: 25% of weights" and heads.tied
    chosen = _planned(big, heads.recipe)
    assert chosen["model.embed_tokens"] == "int8:channel" and "lm_head" not in chosen  # tied: planned once
    small = tiny_model("llama", vocab_size=64)  # 64 x 64 embedding: 5%
    heads = plan_embeddings(_w4(), small, HeadOptions())
    assert heads.recipe.rules[0].spec is None and "model.embed_tokens" not in _planned(small, heads.recipe)
    assert heads.embedding_reason.startswith("default: 5% of weights")
    # Under a size bound it cannot meet, the defaults step down to the last option: int6 rows, head too.
    bound = plan_embeddings(_w4(), small, HeadOptions(), fits=lambda recipe: False)
    assert _planned(small, bound.recipe)["model.embed_tokens"] == "int6:channel"
    assert "fp16 would exceed" in plan_embeddings(_w4(), small, HeadOptions(),
                                                  fits=lambda r: r.rules[0].spec is not None).embedding_reason
    # A float cast quantizes nothing, so the embedding is not quantized either.
    cast = plan_embeddings(_w4(scheme="W16A16"), big, HeadOptions())
    assert _planned(big, cast.recipe) == {}


def test_flags_untied_head_and_conflicts():
    untied = tiny_model("llama", tie_word_embeddings=False)
    heads = plan_embeddings(_w4(), untied, HeadOptions(embeddings="int4", lm_head="int8"))
    chosen = _planned(untied, heads.recipe)
    assert chosen["model.embed_tokens"] == "int4:g32" and chosen["lm_head"] == "int8:channel"
    assert "lm_head" not in heads.recipe.ignore
    assert heads.describe({}) == {"embeddings": "keep (--embeddings)", "lm_head": "keep (--lm-head)"}
    default = plan_embeddings(_w4(), untied, HeadOptions())
    assert "lm_head" not in _planned(untied, default.recipe)  # an untied head stays in float unless asked
    squeezed = plan_embeddings(_w4(), untied, HeadOptions(), fits=lambda r: "lm_head" not in r.ignore)
    assert _planned(untied, squeezed.recipe)["lm_head"] == "int8:channel"
    assert squeezed.head_reason == "default: fp16 would exceed the size bound"
    with pytest.raises(LowbitError, match="tied to model.embed_tokens"):
        plan_embeddings(_w4(), make_tiny_llama(), HeadOptions(embeddings="int8", lm_head="int4"))
    tied = plan_embeddings(_w4(), make_tiny_llama(), HeadOptions(lm_head="int4:g32:asym"))  # the head is the table
    assert str(tied.recipe.rules[0].spec) == "int4:g32:asym" and tied.embedding_reason == "--lm-head, tied"
    with pytest.raises(LowbitError, match="--embeddings 'int9'"):
        plan_embeddings(_w4(), make_tiny_llama(), HeadOptions(embeddings="int9"))


def test_a_recipe_that_names_the_embedding_is_left_alone(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("scheme: mixed\nrules:\n  - {targets: [Embedding], spec: 'int4:g64'}\n"
                    "  - {targets: [Linear], spec: 'int4:g32'}\n")
    model = make_tiny_llama()
    heads = plan_embeddings(_w4(recipe_file=str(path)), model, HeadOptions())
    assert heads.embedding_reason == "recipe" and len(heads.recipe.rules) == 2
    assert _planned(model, heads.recipe)["model.embed_tokens"] == "int4:g64"


def test_tied_quantized_embedding_is_stored_once_and_reloads_tied(tmp_path):
    model = make_tiny_llama()
    recipe = plan_embeddings(_w4(group_size=32), model, HeadOptions()).recipe
    qm = quantize_model(model, recipe, progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    write_checkpoint(qm, tmp_path, model.config, make_tokenizer("a b c " * 200), {"kind": "causal-lm"})
    save_recipe(recipe, tmp_path / "recipe.yaml")
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {"model.embed_tokens.weight.qcodes", "model.embed_tokens.weight.scales"} <= keys
    assert not any(k.startswith("lm_head") for k in keys) and "model.embed_tokens.weight" not in keys
    qtensors, _ = read_qtensors(tmp_path / "model.safetensors")
    table = dequantize(qtensors["model.embed_tokens.weight"])
    reloaded, _, _ = load_checkpoint(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.model.embed_tokens.weight.data, table)
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    # recipe.yaml reproduces the choice as an ordinary rule, without the default's help.
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again.rules[0].targets == ("model.embed_tokens",) and _planned(make_tiny_llama(), again) == _planned(
        make_tiny_llama(), recipe)


def test_gguf_estimate_follows_llama_cpp_types():
    wide = tiny_model("gemma3", vocab_size=8192, hidden_size=256, head_dim=64)
    ref = gguf_bytes(wide)
    # Tied and rows of 256: the table is Q6_K (210 bytes per 256 values), as llama.cpp makes it.
    assert ref["tensor_types"]["Q6_K"] >= 1 and ref["bytes"] > 8192 * 256 * 210 // 256
    narrow = gguf_bytes(tiny_model("gemma3", vocab_size=8192))  # rows of 64 fit no k-quant: Q8_0 / Q5_0
    assert "Q6_K" not in narrow["tensor_types"] and "Q4_K" not in narrow["tensor_types"]
    assert gguf_bytes(tiny_model("bert")) is not None and gguf_bytes(torch.nn.Linear(4, 4)) is None


def test_int8_would_break_the_size_rule_so_the_default_steps_down():
    wide = tiny_model("gemma3", vocab_size=8192, hidden_size=256, head_dim=64)
    recipe = _w4()
    int8 = plan_embeddings(recipe, wide, HeadOptions(embeddings="int8")).recipe
    assert recipe_bytes(wide, int8) > gguf_bytes(wide)["bytes"]  # int8 rows (8.06 bits) vs Q6_K (6.56 bits)
    heads = plan_heads(QuantizeOptions(), recipe, wide)
    assert str(heads.recipe.rules[0].spec) == "int6:channel"
    assert "int8 would exceed the size bound" in heads.embedding_reason
    assert recipe_bytes(wide, heads.recipe) <= gguf_bytes(wide)["bytes"]


@pytest.mark.parametrize("family,overrides", [("llama", {"vocab_size": 4096}), ("gemma3", {"vocab_size": 8192}),
                                              ("gemma3", {"vocab_size": 8192, "hidden_size": 256, "head_dim": 64})])
def test_w4a16_output_is_not_larger_than_the_q4_k_m_gguf(tmp_path, capsys, family, overrides):
    """Vocabulary-dominated tiny models (embedding 78-88% of the weights): with the default embedding handling
    the written safetensors file is not larger than the Q4_K_M GGUF's tensor data; kept in fp16 it would be."""
    src = save_tiny(family, tmp_path / "src", **overrides)
    reports = {}
    for name, extra in (("default", []), ("keep", ["--embeddings", "keep"])):
        out = tmp_path / name
        assert main(["quantize", str(src), "--scheme", "W4A16", "--out", str(out), "--no-eval", "--json", *extra]) == 0
        capsys.readouterr()
        reports[name] = json.loads((out / "report.json").read_text())
    ref = reports["default"]["gguf_reference"]
    assert ref["type"] == "Q4_K_M"
    assert ref["output_bytes"] == (tmp_path / "default" / "model.safetensors").stat().st_size
    assert ref["not_larger"] and ref["output_bytes"] <= ref["tensor_bytes"]
    assert reports["default"]["embeddings"].split(" ")[0] in ("int8:channel", "int6:channel")
    head = reports["default"]["lm_head"]  # the Llama's head is untied: in float it alone would break the rule
    assert head.startswith("tied to model.embed_tokens: ") if family == "gemma3" else head.startswith("int")
    assert not reports["keep"]["gguf_reference"]["not_larger"]
