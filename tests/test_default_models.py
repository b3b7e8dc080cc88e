"""The real default models: SmolLM2-135M (GGUF Q4_1, dequantized to float) and all-MiniLM-L6-v2 (fp32).

The original's outputs are computed once per module; each scheme quantizes a fresh copy of the weights.
"""

from __future__ import annotations

import copy

import pytest

from lowbit.data.text import default_text, eval_windows, paragraphs, tokenize
from lowbit.eval.encoder import compare_embeddings, embed
from lowbit.eval.lm import compare_lm, lm_reference
from lowbit.model.apply import quantize_model
from lowbit.model.load import CAUSAL_LM, ENCODER, load_model
from lowbit.workflow import QuantizeOptions, build_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    loaded = load_model("smollm2")
    windows = eval_windows(tokenize(loaded.tokenizer, default_text()), 4, 512)
    return loaded, lm_reference(loaded.model, windows.ids, progress=False)


def _kld(smollm2, **options) -> dict:
    loaded, ref = smollm2
    model = copy.deepcopy(loaded.model)
    quantize_model(model, build_recipe(QuantizeOptions(**options)), progress=False)
    return compare_lm(model, ref, progress=False)


def test_default_llm_loads_as_float_llama(smollm2):
    loaded, ref = smollm2
    assert loaded.kind == CAUSAL_LM
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert 5 < ref.ppl < 50


def test_w8a16_is_nearly_lossless(smollm2):
    m = _kld(smollm2, scheme="W8A16")
    assert m["kld"] < 0.01
    assert m["top1"] > 0.95


def test_w4a16_asymmetric_beats_symmetric(smollm2):
    sym = _kld(smollm2, scheme="W4A16", group_size=128, symmetric=True)
    asym = _kld(smollm2, scheme="W4A16", group_size=128, symmetric=False)
    assert asym["kld"] < sym["kld"]
    assert asym["ppl"] < sym["ppl"] * 1.05


def test_encoder_w8a16_cosine():
    loaded = load_model("minilm")
    assert loaded.kind == ENCODER
    sentences = paragraphs(default_text(), 128)
    ref = embed(loaded.model, loaded.tokenizer, sentences, progress=False)
    quantize_model(loaded.model, build_recipe(QuantizeOptions(scheme="W8A16")), progress=False)
    m = compare_embeddings(ref, embed(loaded.model, loaded.tokenizer, sentences, progress=False))
    assert m["cosine"] >= 0.999
