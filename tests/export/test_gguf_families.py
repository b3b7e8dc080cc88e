"""GGUF export of every decoder family in lowbit's architecture table: llama.cpp (llama-cpp-python) loads each
file and its next-token log-probabilities equal the transformers float model's; the file also loads back through
transformers' GGUF reader; families without a table entry are refused in one line with no file written.

Measured on the tiny models (2 windows x 96 tokens, F32 KV cache): llama, mistral, qwen2, qwen3, phi3 agree to
~3e-6; gemma2, gemma3 and gpt2 to 1.0e-3..1.2e-3, because llama.cpp's CPU GELU reads a float16 lookup table (emulating
that table in transformers brings them to 2e-4..4e-4).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.cli import main
from lowbit.data.text import load_text, tokenize
from lowbit.errors import LowbitError
from lowbit.eval.llamacpp import gguf_logprobs
from lowbit.export.gguf import GGUFExportOptions, export_gguf
from lowbit.model.load import load_model
from tests.arch_models import DECODERS, save_tiny

GELU_FAMILIES = ("gemma2", "gemma3", "gpt2")  # llama.cpp's CPU GELU goes through a float16 table
F32_TOL = {f: (2.5e-3 if f in GELU_FAMILIES else 1e-4) for f in DECODERS}
F16_TOL = 1e-2  # measured 1.9e-3 .. 5.0e-3 (weights rounded to float16)
# Configs whose numbers transformers' GGUF reader cannot recover, set to the values it assumes, so the
# round trip through transformers can be exact: it reads no head_dim for qwen3 (default 128), no
# query_pre_attn_scalar for Gemma (default 256), and GPT-2's context_length into n_ctx, not n_positions.
ROUNDTRIP = {"qwen3": dict(head_dim=128), "gemma2": dict(head_dim=256, query_pre_attn_scalar=256),
             "gemma3": dict(head_dim=256, query_pre_attn_scalar=256), "gpt2": dict(n_positions=1024)}


def _folder(tmp_path_factory, family: str, **overrides) -> Path:
    # The folder is called "hf": llama.cpp treats a model whose general.name contains "phi3" specially and
    # then needs Phi-3's own special tokens, which the tiny tokenizer lacks.
    return save_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}") / "hf", **overrides)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = _folder(tmp_path_factory, family)
        return made[family]
    return get


def _windows(tokenizer, n: int = 2, length: int = 96) -> torch.Tensor:
    """Token windows from the default text, longer than the tiny Gemmas' sliding window (64)."""
    ids = tokenize(tokenizer, load_text(None))
    return torch.stack([ids[i * length:(i + 1) * length] for i in range(n)])


@torch.no_grad()
def _reference(model, windows: torch.Tensor) -> list[torch.Tensor]:
    return [torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].float(), dim=-1) for ids in windows]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("family", DECODERS)
def test_llamacpp_matches_transformers(tmp_path, folders, family):
    """F32 and F16 files give transformers' log-probs in llama.cpp; Q8_0 loads and stays close."""
    folder = folders(family)
    loaded = load_model(str(folder))
    windows = _windows(loaded.tokenizer)
    ref = _reference(loaded.model, windows)
    got = {}
    for type_name in ("F32", "F16", "Q8_0"):
        out = tmp_path / f"{type_name}.gguf"
        export_gguf(GGUFExportOptions(model=str(folder), type=type_name, out=str(out), method="rtn"),
                    progress=False, loaded=loaded)
        got[type_name] = gguf_logprobs(out, windows, f32_cache=True)
        assert all(torch.isfinite(lp).all() for lp in got[type_name])
    diffs = {t: _max_diff(ref, lp) for t, lp in got.items()}
    print(f"{family}: max |logprob diff| vs transformers: " + json.dumps({t: f"{d:.2e}" for t, d in diffs.items()}))
    assert diffs["F32"] < F32_TOL[family]
    assert diffs["F16"] < F16_TOL
    top1 = np.mean([float((r.argmax(-1) == q.argmax(-1)).float().mean()) for r, q in zip(ref, got["Q8_0"])])
    assert top1 > 0.8


@pytest.mark.parametrize("family", DECODERS)
def test_transformers_reads_the_file_back(tmp_path_factory, tmp_path, family):
    """transformers' GGUF reader undoes our layouts (Q/K permutation, Gemma's +1 norms, GPT-2's transposes)."""
    folder = _folder(tmp_path_factory, family, **ROUNDTRIP.get(family, {}))
    loaded = load_model(str(folder))
    out = tmp_path / "f32.gguf"
    export_gguf(GGUFExportOptions(model=str(folder), type="F32", out=str(out), method="rtn"), progress=False,
                loaded=loaded)
    back = load_model(str(out)).model
    ids = _windows(loaded.tokenizer, 1, 80)
    with torch.no_grad():
        assert float((loaded.model(input_ids=ids).logits - back(input_ids=ids).logits).abs().max()) < 1e-4


def test_gguf_layout_per_family(tmp_path, folders):
    """Architecture keys and tensors as llama.cpp's loaders read them."""
    import gguf

    expect = {"gemma2": ({"gemma2.attn_logit_softcapping", "gemma2.final_logit_softcapping",
                          "gemma2.attention.sliding_window", "gemma2.attention.sliding_window_pattern"},
                         {"blk.0.post_ffw_norm.weight"}, {"output.weight"}),
              "gemma3": ({"gemma3.rope.freq_base_swa", "gemma3.attention.sliding_window"},
                         {"blk.0.attn_q_norm.weight"}, {"output.weight"}),
              "qwen2": (set(), {"blk.0.attn_q.bias", "output.weight"}, set()),
              "phi3": ({"phi3.attention.sliding_window"}, {"blk.0.attn_qkv.weight"}, {"blk.0.ffn_gate.weight"}),
              "gpt2": ({"gpt2.attention.layer_norm_epsilon"}, {"position_embd.weight", "blk.0.attn_qkv.bias"},
                       {"output.weight"})}
    for family, (keys, present, absent) in expect.items():
        loaded = load_model(str(folders(family)))
        out = tmp_path / f"{family}.gguf"
        export_gguf(GGUFExportOptions(model=str(folders(family)), type="Q8_0", out=str(out), method="rtn"),
                    progress=False, loaded=loaded)
        reader = gguf.GGUFReader(str(out))
        tensors = {t.name: t for t in reader.tensors}
        assert reader.fields["general.architecture"].contents() == family
        assert keys <= set(reader.fields) and present <= set(tensors) and not absent & set(tensors)
        if family == "gemma2":  # norms stored as 1 + weight
            w = loaded.model.model.layers[0].input_layernorm.weight.detach().numpy()
            np.testing.assert_allclose(np.asarray(tensors["blk.0.attn_norm.weight"].data), w + 1, rtol=1e-6)
        if family == "phi3":  # fused gate+up stays fused: 2 x intermediate rows; a fused qkv is typed like attn_v
            assert tuple(tensors["blk.0.ffn_up.weight"].shape) == (64, 256)
        if family == "gpt2":
            assert tensors["position_embd.weight"].tensor_type.name == "F32"


def _one_line_error(args: list[str], capsys) -> str:
    code = main(["export", "gguf", *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lowbit: error:")]
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def test_families_without_gguf_rules_are_refused(tmp_path, tmp_path_factory, folders, capsys):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from lowbit.data.text import default_text
    from tests.conftest import make_tokenizer

    neox = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4)).save_pretrained(str(neox))
    make_tokenizer(default_text()).save_pretrained(str(neox))
    untied = _folder(tmp_path_factory, "gemma2", tie_word_embeddings=False)
    out = tmp_path / "never.gguf"
    cases = [(neox, "needs an architecture-table entry for model type 'gpt_neox'"),
             (untied, "separate lm_head"),
             (_folder(tmp_path_factory, "bert"), "needs a causal language model")]
    for folder, match in cases:
        line = _one_line_error([str(folder), "--type", "F32", "--method", "rtn", "--out", str(out)], capsys)
        assert match in line
        assert not out.exists() and not list(tmp_path.glob(".never.gguf.tmp-*"))


def test_mocked_model_type_is_refused(folders, tmp_path):
    loaded = load_model(str(folders("llama")))
    loaded.model.config.model_type = "mystery"
    out = tmp_path / "x.gguf"
    with pytest.raises(LowbitError, match="'mystery'") as err:
        export_gguf(GGUFExportOptions(model=str(folders("llama")), type="F32", out=str(out), method="rtn"),
                    progress=False, loaded=loaded)
    assert "\n" not in str(err.value) and not out.exists()
