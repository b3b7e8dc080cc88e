"""ONNX export on a tiny random BERT: onnx.checker passes, onnxruntime (CPU) runs every graph, its outputs
match lowbit's own fake-quant model (the float model for the float graph), and the stored integer codes
decode, as DequantizeLinear/MatMulInteger read them, to exactly lowbit's quantized weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from lowbit.cli import main  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.eval.encoder import embed  # noqa: E402
from lowbit.export.onnx import OnnxExportOptions, build_onnx, export_onnx  # noqa: E402
from lowbit.export.onnx_int8 import integer_operands  # noqa: E402
from lowbit.export.onnx_weights import onnx_weight  # noqa: E402
from lowbit.formats.quantize import dequantize, quantize  # noqa: E402
from lowbit.formats.spec import parse_spec  # noqa: E402
from lowbit.model.load import load_model  # noqa: E402
from tests.conftest import TINY_VOCAB, make_tokenizer  # noqa: E402

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "def f(x): return x + 1",
             "Numbers like 3.14159 and 2.71828 show up in many places.", "short",
             "A somewhat longer sentence, with commas, clauses, and a few more tokens than the others have."]
FAST = dict(method="rtn", calib_samples=4, calib_length=32, sensitivity_sentences=8)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 64, 2 heads, FFN 96) saved as a Hugging Face folder with a tokenizer."""
    from transformers import BertConfig, BertModel

    from lowbit.data.text import default_text

    torch.manual_seed(0)
    config = BertConfig(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=96, max_position_embeddings=128, pad_token_id=0)
    model = BertModel(config).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so quantization changes the outputs visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3)
    path = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(str(path), safe_serialization=True)
    make_tokenizer(default_text()).save_pretrained(str(path))
    config_file = path / "tokenizer_config.json"  # a BERT tokenizer also returns token_type_ids
    tok_config = json.loads(config_file.read_text())
    tok_config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    config_file.write_text(json.dumps(tok_config))
    return path


def _feeds(tokenizer, proto) -> dict[str, np.ndarray]:
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    names = [i.name for i in proto.graph.input]
    return {n: batch[n].astype(np.int64) if n in batch else np.zeros_like(batch["input_ids"], np.int64) for n in names}


def _run(proto, feeds, optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _build(bert_dir, **options):
    loaded = load_model(str(bert_dir))
    proto, quantized, lowering = build_onnx(loaded, OnnxExportOptions(model=str(bert_dir), **options))
    onnx.checker.check_model(proto, full_check=True)
    return loaded, proto, quantized, lowering


def _ours(loaded) -> np.ndarray:
    return embed(loaded.model, loaded.tokenizer, SENTENCES, progress=False).numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_float_graph_matches_the_model(bert_dir):
    loaded, proto, _, _ = _build(bert_dir, mode="float")
    assert [o.name for o in proto.graph.output] == ["embedding"]
    assert {i.name for i in proto.graph.input} == {"input_ids", "attention_mask", "token_type_ids"}
    np.testing.assert_allclose(_run(proto, _feeds(loaded.tokenizer, proto)), _ours(loaded), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("weights", ["int7:channel", "int8:channel"])
def test_int8_graph_matches_fake_quant_model(bert_dir, weights):
    loaded, proto, quantized, lowering = _build(bert_dir, mode="int8", weights=weights, token_linears=3, **FAST)
    lowered = {name: how for name, how in lowering.items() if how != "absent"}
    assert set(lowered) == {n.rsplit(".", 1)[0] for n in quantized.qtensors} - {"pooler.dense"}
    assert [n for n, how in lowered.items() if "embeddings" not in n and how != "int8"] == []
    ops = {n.op_type for n in proto.graph.node}
    assert {"MatMulInteger", "MatMulIntegerToFloat", "QuantizeLinear"} <= ops and "MatMul" in ops
    assert sum("token" in str(r.input_spec) for r in quantized.recipe.rules) == 3
    got, want = _run(proto, _feeds(loaded.tokenizer, proto)), _ours(loaded)
    assert _cosine(got, want).min() > 0.9999
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max())


@pytest.mark.parametrize("weights", ["int7:channel", "int8:channel"])
def test_int8_graph_weights_decode_to_ours(bert_dir, weights):
    _, proto, quantized, _ = _build(bert_dir, mode="int8", weights=weights, token_linears=0, **FAST)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for pname, qt in quantized.qtensors.items():
        module = pname.rsplit(".", 1)[0]
        if "embeddings" in module or module == "pooler.dense":
            continue
        codes, zero, scale = (inits[f"{module}.{k}"] for k in ("codes", "zero_point", "scale"))
        assert codes.dtype == (np.int8 if weights.startswith("int7") else np.uint8)
        decoded = (codes.astype(np.float32) - zero.astype(np.float32)) * scale
        np.testing.assert_array_equal(decoded, dequantize(qt).numpy().T)


@pytest.mark.parametrize("mode", ["int8", "qdq"])
def test_static_activation_scales_match_fake_quant_model(bert_dir, mode):
    loaded, proto, quantized, lowering = _build(bert_dir, mode=mode, activations="int8:tensor:static:minmax",
                                                **{**FAST, "method": "gptq"})
    assert {"int8"} == {h for n, h in lowering.items() if "encoder" in n} if mode == "int8" else True
    got, want = _run(proto, _feeds(loaded.tokenizer, proto), optimize=mode == "int8"), _ours(loaded)
    assert _cosine(got, want).min() > 0.9999
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max())


@pytest.mark.parametrize("mode", ["int8", "qdq"])
def test_asymmetric_dynamic_inputs_match_fake_quant_model_and_fuse(bert_dir, mode, tmp_path):
    """int8:tensor:dynamic:asym inputs are one DynamicQuantizeLinear each (shared by linears that read the same
    input); onnxruntime fuses it with a single reader's product into DynamicQuantizeMatMul."""
    loaded, proto, quantized, lowering = _build(bert_dir, mode=mode, activations="int8:tensor:dynamic:asym",
                                                act_rules=("encoder.layer.1.output.dense=int8:token:dynamic",),
                                                **{**FAST, "token_linears": 0})
    ops = [n.op_type for n in proto.graph.node]
    # int8: one per distinct input (q/k/v share theirs): 4 per layer, less the per-token one; qdq: one per linear
    assert ops.count("DynamicQuantizeLinear") == (2 * 4 - 1 if mode == "int8" else 2 * 6 - 1) and "ReduceMax" in ops
    feeds = _feeds(loaded.tokenizer, proto)
    got, want = _run(proto, feeds, optimize=False), _ours(loaded)
    assert _cosine(got, want).min() > 0.9999
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max())
    if mode == "int8":
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
        assert "DynamicQuantizeMatMul" in fused and "ReduceMin" in fused  # the per-token ones keep theirs
        assert _cosine(_run(proto, feeds), want).min() > 0.9999


def test_qdq_graph_per_token_matches_fake_quant_model(bert_dir):
    loaded, proto, quantized, lowering = _build(bert_dir, mode="qdq", scheme="W8A8", **FAST)
    assert set(v for v in lowering.values()) == {"qdq", "absent"}
    ops = [n.op_type for n in proto.graph.node]
    assert "MatMulInteger" not in ops and ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 12
    feeds = _feeds(loaded.tokenizer, proto)
    got, want = _run(proto, feeds, optimize=False), _ours(loaded)
    assert _cosine(got, want).min() > 0.9999
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max())
    # with all optimizations onnxruntime fuses some Q/DQ pairs into its own kernels: close, not identical
    assert _cosine(_run(proto, feeds), want).min() > 0.999


@pytest.mark.parametrize("weights", ["int4:g32", "int4:g32:asym", "int8:tensor", "int3:channel:asym"])
def test_qdq_weight_only_decodes_exactly_and_matches(bert_dir, weights):
    loaded, proto, quantized, _ = _build(bert_dir, mode="qdq", scheme="W4A16", weights=weights, **FAST)
    got = _run(proto, _feeds(loaded.tokenizer, proto), optimize=False)
    np.testing.assert_allclose(got, _ours(loaded), atol=1e-4, rtol=1e-3)
    inits = {i.name: i for i in proto.graph.initializer}
    module = "encoder.layer.0.intermediate.dense"
    qt = quantized.qtensors[module + ".weight"]
    codes = inits[f"{module}.codes"]
    expected_type = onnx.TensorProto.INT4 if weights.startswith("int4:g32") and "asym" not in weights else None
    if expected_type is not None:
        assert codes.data_type == expected_type
    weight = onnx_weight(qt, transpose=True)
    np.testing.assert_array_equal(numpy_helper.to_array(codes).astype(np.int32), weight.codes.astype(np.int32))
    np.testing.assert_array_equal(weight.dequantize(), dequantize(qt).numpy().T)


def test_integer_operands_pick_the_exact_kernel():
    w = torch.randn(16, 40)
    seven = onnx_weight(quantize(w, parse_spec("int7:channel")), transpose=True)
    eight = onnx_weight(quantize(w, parse_spec("int8:channel")), transpose=True)
    codes, zero = integer_operands(seven)
    assert codes.dtype == np.int8 and int(zero) == 0 and np.abs(codes).max() <= 64
    codes, zero = integer_operands(eight)
    assert codes.dtype == np.uint8 and int(zero) == 128
    np.testing.assert_array_equal(codes.astype(np.int16) - 128, eight.codes)


def test_gptq_and_cli_write_a_checked_file(bert_dir, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", "onnx", str(bert_dir), "--out", str(out), "--calib-samples", "4", "--calib-length", "32",
                 "--token-linears", "2", "--sensitivity-sentences", "8", "--json"]) in (0, None)
    assert '"mode": "int8"' in capsys.readouterr().out
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    loaded = load_model(str(bert_dir))
    assert _run(proto, _feeds(loaded.tokenizer, proto)).shape == (len(SENTENCES), 64)
    # an existing output is refused in one line and left alone; no temporary files are left behind
    assert main(["export", "onnx", str(bert_dir), "--out", str(out), "--method", "rtn"]) not in (0, None)
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_bad_inputs_are_one_line_errors(bert_dir, tiny_llama_dir, tmp_path):
    with pytest.raises(LowbitError, match="quantize it first"):
        export_onnx(OnnxExportOptions(model=str(tiny_llama_dir), out=str(tmp_path / "x.onnx"), **FAST))
    with pytest.raises(LowbitError, match="integer specs"):
        _build(bert_dir, mode="qdq", scheme="W4A16", weights="nf4:g32", **FAST)
    with pytest.raises(LowbitError, match="unknown ONNX mode"):
        OnnxExportOptions(mode="fp8")
    assert not any(tmp_path.iterdir())
