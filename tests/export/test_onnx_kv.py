"""The KV-cache ONNX graph of a causal LM (tiny random Llama and Qwen2): greedy decoding in onnxruntime one token
per step equals transformers' greedy decoding, whole windows with an empty past equal the graph without a
cache, the quantizing rewrites (MatMulNBits int4, int8 kernels, QDQ) apply to it unchanged and compute what
lowbit's fake-quant model computes, and bad input fails in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lowbit.cli import main  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.eval.engines import OnnxLM, TransformersLM  # noqa: E402
from lowbit.eval.generation import greedy_continuation  # noqa: E402
from lowbit.eval.onnxruntime_lm import OnnxCausalLM  # noqa: E402
from lowbit.export.onnx import OnnxExportOptions, export_onnx  # noqa: E402
from lowbit.export.onnx_checkpoint import OnnxCheckpointOptions, export_onnx_checkpoint  # noqa: E402
from lowbit.export.onnx_kv import trace_causal_lm_kv  # noqa: E402
from lowbit.model.checkpoint import load_checkpoint  # noqa: E402
from lowbit.model.load import load_model  # noqa: E402
from tests.arch_models import save_tiny, tiny_model  # noqa: E402
from tests.export.helpers import quantize_folder  # noqa: E402

FAMILIES = ("llama", "qwen2")
PROMPTS = [[5, 77, 301, 12, 9, 140, 33], [400, 21, 8, 97, 250, 3, 61, 18, 200, 44, 6]]
NEW_TOKENS = 12
# onnxruntime fuses blocked int4 DequantizeLinear + MatMul into its MatMulNBits at accuracy level 4 (int8
# activations) unless told otherwise; level 0 keeps the float computation the QDQ graph describes.
EXACT_QDQ = {"session.qdq_matmulnbits_accuracy_level": "0"}


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, save_tiny(request.param, tmp_path_factory.mktemp(request.param) / "hf", seed=3)


@pytest.fixture(scope="module")
def float_graph(family_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("float") / "model.onnx"
    export_onnx(OnnxExportOptions(model=str(family_dir[1]), mode="float", out=str(out)))
    return out


def _close(got: np.ndarray, expected: np.ndarray, tolerance: float = 1e-4) -> None:
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < tolerance * max(1.0, float(np.abs(expected).max()))


def _transformers_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy generation (``generate`` with sampling off), exactly ``n`` new tokens."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_graph_has_the_optimum_layout(float_graph):
    session = OnnxCausalLM(float_graph, threads=1).session
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert len(inputs) == 3 + 4 and len(outputs) == 1 + 4
    assert outputs["present.0.key"] == ["batch", 2, "total_sequence", 16]
    assert outputs["logits"][:2] == ["batch", "sequence"]


def test_greedy_decode_one_token_per_step_equals_transformers(family_dir, float_graph):
    model = load_model(str(family_dir[1])).model
    engine = OnnxLM(float_graph, threads=1)
    torch_lm = TransformersLM(model)
    for prompt in PROMPTS:
        ours = greedy_continuation(engine, prompt, NEW_TOKENS)
        assert ours == _transformers_greedy(model, prompt, NEW_TOKENS)
        assert len(set(ours)) > 2
        for step in range(0, NEW_TOKENS, 3):  # the logits along the way agree
            ids = prompt + ours[:step]
            _close(engine(ids), torch_lm(ids))
    engine.close()


def test_whole_window_with_empty_past_equals_the_graph_without_a_cache(family_dir, float_graph, tmp_path):
    window = tmp_path / "window.onnx"
    export_onnx(OnnxExportOptions(model=str(family_dir[1]), mode="float", out=str(window), kv_cache=False))
    ids = torch.randint(3, 512, (2, 23), generator=torch.Generator().manual_seed(1)).numpy()
    kv, no_cache = OnnxCausalLM(float_graph, threads=1), OnnxCausalLM(window, threads=1)
    assert kv.layout.has_cache and not no_cache.layout.has_cache
    full, present = kv.run(ids)
    _close(full, no_cache.run(ids)[0], 1e-5)
    assert [p.shape for p in present] == [(2, 2, 23, 16)] * 4
    # the same window in chunks of several tokens, each with the previous chunk's present as its past
    first, past = kv.run(ids[:, :10])
    second, past = kv.run(ids[:, 10:17], past)
    third, _ = kv.run(ids[:, 17:], past)
    _close(np.concatenate([first, second, third], axis=1), full, 1e-5)


def test_attention_mask_hides_left_padding(float_graph):
    """The graph honours attention_mask as optimum's graphs do: a left-padded row (its position ids counting real
    tokens only) gets the logits it gets alone, in the prompt and in a decode step after it."""
    lm = OnnxCausalLM(float_graph, threads=1)
    short, long = PROMPTS
    pad = len(long) - len(short)
    ids = np.array([[0] * pad + short, long])
    mask = np.array([[0] * pad + [1] * len(short), [1] * len(long)])
    positions = np.clip(mask.cumsum(1) - 1, 0, None)
    names = [i.name for i in lm.session.get_inputs()]
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
            **{name: past for name, past in zip(names[3:], lm.empty_past(2))}}
    logits, *present = lm.session.run(None, feed)
    alone, alone_past = lm.run(np.array([short]))
    _close(logits[0, pad:], alone[0], 1e-5)
    step = {"input_ids": np.array([[9], [9]]), "attention_mask": np.concatenate([mask, [[1], [1]]], 1),
            "position_ids": positions[:, -1:] + 1, **dict(zip(names[3:], present))}
    _close(lm.session.run(None, step)[0][0], lm.run(np.array([[9]]), alone_past)[0][0], 1e-5)


@pytest.mark.parametrize("args, mode, lowered", [
    (["--scheme", "W4A16", "--group-size", "32", "--lm-head", "keep"], "int8", "matmulnbits"),
    (["--scheme", "W4A16", "--group-size", "32", "--asym", "--lm-head", "keep"], "qdq", "qdq"),
    (["--scheme", "W8A8", "--lm-head", "keep"], "int8", "int8"),
])
def test_lowered_kv_graph_decodes_as_the_fake_quant_model(family_dir, tmp_path, args, mode, lowered):
    ckpt = quantize_folder(family_dir[1], tmp_path / "q", args)
    summary = export_onnx_checkpoint(OnnxCheckpointOptions(str(ckpt), str(tmp_path / "q.onnx"), mode=mode,
                                                           accuracy_level=0))
    assert set(summary["lowering"].values()) == {lowered} and len(summary["lowering"]) == 14
    model, _, _ = load_checkpoint(ckpt)
    engine, torch_lm = OnnxLM(tmp_path / "q.onnx", threads=1, config=EXACT_QDQ), TransformersLM(model)
    assert engine.lm.layout.has_cache
    # W8A8 rounds activations to int8: a last-bit difference before rounding can move a code by one step
    tolerance = 2e-2 if lowered == "int8" else 1e-4
    for prompt in PROMPTS:
        ours = greedy_continuation(torch_lm, prompt, NEW_TOKENS)
        if lowered != "int8":
            assert greedy_continuation(engine, prompt, NEW_TOKENS) == ours
        for step in range(0, NEW_TOKENS, 4):
            ids = prompt + ours[:step]
            _close(engine(ids), torch_lm(ids), tolerance)
    engine.close()


def test_cli_writes_the_kv_graph_by_default_and_the_window_graph_on_request(family_dir, tmp_path, capsys):
    ckpt = quantize_folder(family_dir[1], tmp_path / "q", ["--scheme", "W4A16", "--group-size", "32"])
    assert main(["export", "onnx", str(ckpt), "--out", str(tmp_path / "kv.onnx")]) == 0
    assert "KV cache): 14 matmulnbits" in capsys.readouterr().out
    assert main(["export", "onnx", str(ckpt), "--no-kv-cache", "--out", str(tmp_path / "w.onnx")]) == 0
    assert "opset 21): 14 matmulnbits" in capsys.readouterr().out
    kv, window = OnnxCausalLM(tmp_path / "kv.onnx", 1), OnnxCausalLM(tmp_path / "w.onnx", 1)
    assert kv.layout.layers == 2 and not window.layout.has_cache
    ids = np.array([PROMPTS[1]])
    _close(kv.run(ids)[0], window.run(ids)[0], 1e-5)


def test_a_past_that_does_not_fit_the_graph_is_refused(float_graph):
    lm = OnnxCausalLM(float_graph, threads=1)
    _, past = lm.run(np.array([[5, 6, 7]]))
    with pytest.raises(LowbitError, match=r"the past has 3 arrays; model.onnx has 2 layers, so it takes 4"):
        lm.run(np.array([[8]]), past[:3])
    shorter = [past[0][:, :, :2]] + past[1:]
    with pytest.raises(LowbitError, match=r"all of one length; got \[1, 2, 2, 16\], \[1, 2, 3, 16\]$"):
        lm.run(np.array([[8]]), shorter)
    with pytest.raises(LowbitError, match=r"past array must have shape \[batch 2, kv_heads 2, past length, "):
        lm.run(np.array([[8], [9]]), past)
    with pytest.raises(LowbitError, match="must be float32"):
        lm.run(np.array([[8]]), [p.astype(np.float64) for p in past])
    with pytest.raises(LowbitError, match=r"token ids must be a non-empty \[batch, tokens\] integer array"):
        lm.run(np.array([5, 6]))


def test_graphs_without_the_expected_inputs_are_refused(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["past_key_values.0.key"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 4]),
                               helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "half.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(LowbitError, match=r"half.onnx is not a causal-LM graph lowbit can run: .* it has inputs "
                                          r"input_ids, past_key_values.0.key and outputs logits$"):
        OnnxCausalLM(path)
    with pytest.raises(LowbitError, match=r"missing.onnx does not exist"):
        OnnxCausalLM(tmp_path / "missing.onnx")


def test_window_graph_is_refused_where_a_cache_is_required(family_dir, tmp_path):
    window = tmp_path / "window.onnx"
    export_onnx(OnnxExportOptions(model=str(family_dir[1]), mode="float", out=str(window), kv_cache=False))
    with pytest.raises(LowbitError, match=r"window.onnx has no KV cache .*re-export it"):
        OnnxCausalLM(window, require_cache=True)


def test_sliding_window_models_get_the_graph_without_a_cache(tmp_path):
    with pytest.raises(LowbitError, match=r"uses sliding-window attention \(window 64 < context 256\).*--no-kv-cache"):
        trace_causal_lm_kv(tiny_model("gemma2"))
    folder = save_tiny("gemma2", tmp_path / "gemma2")
    summary = export_onnx(OnnxExportOptions(model=str(folder), mode="float", out=str(tmp_path / "g.onnx")))
    assert summary["kv_cache"] is False
    engine = OnnxLM(tmp_path / "g.onnx", threads=1)
    assert not engine.lm.layout.has_cache
    _close(engine(PROMPTS[0]), TransformersLM(load_model(str(folder)).model)(PROMPTS[0]))
