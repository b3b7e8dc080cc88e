"""The default model (SmolLM2-135M) through the GGUF exporter: same size as llama.cpp's own quantizer for the
same mix, and llama.cpp's perplexity equals lowbit's evaluation of the same weights (slow)."""

from __future__ import annotations

import ctypes

import pytest

from lowbit.data.text import eval_windows, load_text, tokenize
from lowbit.eval.llamacpp import compare_logprobs, gguf_logprobs
from lowbit.eval.lm import lm_reference
from lowbit.export.gguf import GGUFExportOptions, export_gguf
from lowbit.gguf.mixes import get_mix
from lowbit.model.load import load_model


@pytest.mark.slow
def test_default_model_q4_k_m_size_and_perplexity(tmp_path):
    import llama_cpp

    loaded = load_model(None)
    f32, ours, theirs = tmp_path / "f32.gguf", tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    export_gguf(GGUFExportOptions(type="F32", out=str(f32), method="rtn"), progress=False, loaded=loaded)
    export_gguf(GGUFExportOptions(type="Q4_K_M", out=str(ours), method="imatrix", calib_samples=4),
                progress=False, loaded=loaded)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = get_mix("Q4_K_M").file_type
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    assert ours.stat().st_size == pytest.approx(theirs.stat().st_size, rel=0.01)

    windows = eval_windows(tokenize(loaded.tokenizer, load_text(None)), 2, 512).ids
    lp = gguf_logprobs(ours, windows)
    in_llamacpp = compare_logprobs(lp, lp, windows)["ppl"]
    in_lowbit = lm_reference(load_model(str(ours)).model, windows, progress=False).ppl
    assert in_llamacpp == pytest.approx(in_lowbit, rel=0.01)
