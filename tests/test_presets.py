"""The seeds' layer strategies as presets: the same intent on every family's module names."""

from __future__ import annotations

import json

import pytest

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.model.apply import plan
from lowbit.presets import PRESETS, preset_recipe, resolve_targets
from tests.arch_models import DECODERS, ENCODERS, lowbit_model, save_tiny

ATTENTION_WORDS = ("attn", "attention")


def _specs(family: str, preset: str) -> dict[str, str]:
    model = lowbit_model(family)
    recipe = resolve_targets(preset_recipe(preset), model)
    return {name: str(spec) for name, _, spec in plan(model, recipe)}


def _is_attention(name: str) -> bool:
    return any(w in name for w in ATTENTION_WORDS)


@pytest.mark.parametrize("family", DECODERS + ENCODERS)
def test_edge_keeps_attention_and_gives_ffn_8_bits(family):
    specs = _specs(family, "edge")
    assert specs, "edge quantizes the feed-forward layers"
    assert not any(_is_attention(n) for n in specs), "edge keeps attention in 16 bits"
    assert set(specs.values()) == {"int8:g128"}


@pytest.mark.parametrize("family", DECODERS)
def test_layers_table(family):
    specs = _specs(family, "layers")
    model = lowbit_model(family)
    names = {id(m): n for n, m in model.named_modules()}
    emb = names[id(model.get_input_embeddings())]
    assert specs[emb] == "int8:channel"
    head = model.get_output_embeddings()
    if head.weight is not model.get_input_embeddings().weight:
        assert names[id(head)] not in specs  # the output head stays in full precision
    ffn = [n for n in specs if not _is_attention(n) and n != emb]
    assert ffn and all(specs[n] == "int4:g128:asym" for n in ffn)


def test_mobile_is_4_bit_everywhere_and_unknown_preset_is_refused():
    specs = _specs("llama", "mobile")
    assert all(s.startswith("int4") for s in specs.values())
    with pytest.raises(LowbitError, match="unknown preset"):
        preset_recipe("tiny-phone")
    assert set(PRESETS) == {"layers", "edge", "mobile"}


def test_quantize_with_a_preset_writes_a_plain_recipe(tmp_path):
    folder = save_tiny("qwen2", tmp_path / "model")
    out = tmp_path / "edge"
    assert main(["quantize", str(folder), "--preset", "edge", "--out", str(out), "--windows", "1",
                 "--window-length", "32", "--json"]) == 0
    recipe = (out / "recipe.yaml").read_text()
    assert "@" not in recipe and "preset-edge" in recipe
    report = json.loads((out / "report.json").read_text())
    assert report["scheme"] == "preset-edge" and report["eval"]["kld"] >= 0
