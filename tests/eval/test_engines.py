"""The engines behind generation on tiny models: llama.cpp's continuation through our loop equals llama.cpp's
own greedy generation, onnxruntime's equals the same checkpoint's in transformers, and what ``inspect_target``
reads from the files (and refuses: a GGUF without a tokenizer, a foreign vocabulary, an ONNX graph without the
expected inputs)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.eval.engines import (LlamaCppLM, OnnxLM, Target, TransformersLM, check_vocabulary, inspect_target,
                                 open_engine)
from lowbit.eval.generation import greedy_continuation
from lowbit.model.checkpoint import load_checkpoint
from tests.arch_models import save_tiny
from tests.export.helpers import quantize_folder

PROMPTS = [[5, 77, 301, 12, 9, 140, 33], [400, 21, 8, 97, 250, 3, 61, 18, 200, 44, 6]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Llama (hidden 64, vocab 512, context 256) with its tokenizer."""
    return save_tiny("llama", tmp_path_factory.mktemp("gen") / "hf", seed=5)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir, tmp_path_factory) -> Path:
    from lowbit.export.gguf import GGUFExportOptions, export_gguf

    out = tmp_path_factory.mktemp("gguf") / "tiny-Q8_0.gguf"
    export_gguf(GGUFExportOptions(model=str(tiny_dir), type="Q8_0", out=str(out), method="rtn"), progress=False)
    return out


@pytest.fixture(scope="module")
def w8(tiny_dir, tmp_path_factory) -> Path:
    return quantize_folder(tiny_dir, tmp_path_factory.mktemp("w8") / "q", ["--scheme", "W8A16"])


def test_gguf_continuation_equals_llama_cpp_own_greedy_generation(tiny_gguf):
    import llama_cpp

    target = inspect_target(tiny_gguf)
    engine = open_engine(target, n_ctx=64)
    assert isinstance(engine, LlamaCppLM)
    reference = llama_cpp.Llama(str(tiny_gguf), n_ctx=64, n_threads=2, verbose=False)
    try:
        for prompt in PROMPTS * 2:  # one engine for all: each prompt resets or reuses its KV cache correctly
            ours = greedy_continuation(engine, prompt, 24)
            theirs = list(itertools.islice(reference.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0), 24))
            assert ours == theirs
            assert len(set(ours)) > 2
    finally:
        engine.close()
        reference.close()


def test_inspect_gguf_reads_context_and_the_tokenizer_vocabulary(tiny_gguf, tiny_dir):
    from transformers import AutoTokenizer

    target = inspect_target(tiny_gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    assert (target.kind, target.engine, target.context, target.original) == ("gguf", "llama.cpp", 256, None)
    assert list(target.vocabulary) == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    check_vocabulary(target, tokenizer, "tiny")  # the same vocabulary passes
    foreign = Target(tiny_gguf, "gguf", "llama.cpp", None, 256, tuple(f"t{i}" for i in range(512)))
    with pytest.raises(LowbitError, match=r"vocabulary differs from the tokenizer of tiny \(512 of 512 tokens\)"):
        check_vocabulary(foreign, tokenizer, "tiny")


def test_gguf_without_a_tokenizer_is_refused(tmp_path):
    import gguf

    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LowbitError, match=r"bare.gguf has no tokenizer \(no tokenizer.ggml.tokens in its metadata\)"):
        inspect_target(path)


def test_onnx_continuation_equals_the_checkpoint_in_transformers(w8, tmp_path):
    from lowbit.export.onnx_checkpoint import export_onnx_folder

    export_onnx_folder(w8, tmp_path / "onnx", accuracy_level=0)  # float compute: the checkpoint's own weights
    target = inspect_target(tmp_path / "onnx")
    assert (target.kind, target.engine, target.path.name, target.context) == ("onnx", "onnxruntime", "model.onnx", 256)
    onnx_lm = open_engine(target, n_ctx=64)
    torch_lm = TransformersLM(load_checkpoint(w8)[0])
    for prompt in PROMPTS:
        ours = greedy_continuation(torch_lm, prompt, 16)
        assert greedy_continuation(onnx_lm, prompt, 16) == ours
        for step in range(len(ours)):  # and the logits along the way agree
            ids = prompt + ours[:step]
            expected, got = torch_lm(ids), onnx_lm(ids)
            assert np.abs(got - expected).max() < 1e-4 * max(1.0, float(np.abs(expected).max()))
    onnx_lm.close()


def test_onnx_graph_without_input_ids_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["logits"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(LowbitError, match=r"odd.onnx is not a causal-LM graph lowbit can run: it needs the inputs "
                                          r"input_ids, .* it has inputs x and outputs logits"):
        OnnxLM(path)


def test_inspect_target_kinds_and_bad_paths(w8, tiny_dir, tmp_path):
    target = inspect_target(w8)
    assert (target.kind, target.engine, target.original, target.context) == (
        "lowbit", "transformers", str(tiny_dir), 256)
    plain = inspect_target(tiny_dir)
    assert (plain.kind, plain.original) == ("hf", None)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    for path, message in ((tmp_path / "missing", "does not exist"), (tmp_path / "notes.txt", "neither a .gguf nor"),
                          (tmp_path / "empty", "has no config.json")):
        with pytest.raises(LowbitError, match=message):
            inspect_target(path)
