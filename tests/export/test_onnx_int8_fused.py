"""The int8 ONNX lowering's speed rewrites change no number: linears that read the same input run as one integer
product (q|k|v, gate|up; ``fuse``) whose columns equal the separate products bit for bit; residual Adds
written as Sum and per-token biases stored as rows compute the same sums; per-row embedding tables decode
exactly.

Checked on a tiny random BERT (encoder export, per-tensor and per-token inputs, int8 and uint8 weight codes)
and a tiny random Llama (W8A8 per-token, no biases, an embedding and a head): onnxruntime runs both graphs,
without graph optimizations for the exact comparisons (every intermediate integer product is a graph output
there) and with all of them for what users run.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from lowbit.export.onnx import OnnxExportOptions, build_onnx, onnx_recipe  # noqa: E402
from lowbit.export.onnx_int8 import IntegerLinear, shared_input_groups  # noqa: E402
from lowbit.export.onnx_lower import lower_quantized, residual_sums  # noqa: E402
from lowbit.export.onnx_sites import LinearSite  # noqa: E402
from lowbit.export.onnx_trace import trace_lm  # noqa: E402
from lowbit.export.onnx_weights import onnx_weight  # noqa: E402
from lowbit.formats import dequantize, parse_spec, quantize  # noqa: E402
from lowbit.formats.activation import parse_activation_spec  # noqa: E402
from lowbit.model.apply import quantize_model  # noqa: E402
from lowbit.model.load import load_model  # noqa: E402
from tests.arch_models import lowbit_model, save_tiny  # noqa: E402

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "def f(x): return x + 1",
             "Numbers like 3.14159 and 2.71828 show up in many places.", "short"]
LAYERS = 2
QKV = ("query", "key", "value")
PRODUCTS = ("MatMulInteger", "MatMulIntegerToFloat")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BERT folder whose tokenizer also returns token_type_ids (as BERT's does)."""
    path = save_tiny("bert", tmp_path_factory.mktemp("tiny-bert"))
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    config_file.write_text(json.dumps(config))
    return path


def _session(proto, optimize: bool, path=None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if path is not None:
        options.optimized_model_filepath = str(path)
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _feeds(tokenizer, proto) -> dict[str, np.ndarray]:
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    names = [i.name for i in proto.graph.input]
    return {n: batch[n].astype(np.int64) if n in batch else np.zeros_like(batch["input_ids"], np.int64) for n in names}


def _with_outputs(proto, names: list[str]):
    """A copy of ``proto`` that also outputs ``names`` (shapes left to onnxruntime)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    types = {n.output[0]: TensorProto.INT32 if n.op_type == "MatMulInteger" else TensorProto.FLOAT
             for n in copy.graph.node}
    copy.graph.output.extend(helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), None)
                             for name in names)
    return copy


def _products(proto) -> dict[str, str]:
    """Integer product node name -> its output, for every MatMulInteger / MatMulIntegerToFloat."""
    return {n.name: n.output[0] for n in proto.graph.node if n.op_type in PRODUCTS}


def _build_bert(bert_dir, fuse: bool, **options):
    loaded = load_model(str(bert_dir))
    proto, quantized, lowering = build_onnx(loaded, OnnxExportOptions(model=str(bert_dir), method="rtn", fuse=fuse,
                                                                      **options))
    onnx.checker.check_model(proto, full_check=True)
    return loaded, proto, quantized


def _columns(fused: dict[str, np.ndarray], module: str, widths: dict[str, int]) -> np.ndarray:
    """The columns of ``module`` in the joined product that holds it."""
    for name, values in fused.items():
        members = name.split("/")[0].split("+")
        if module in members:
            start = sum(widths[m] for m in members[:members.index(module)])
            return values[..., start:start + widths[module]]
    raise AssertionError(f"{module} is in no joined product")


@pytest.mark.parametrize("weights", ["int7:channel", "int8:channel"])
@pytest.mark.parametrize("inputs", ["int8:tensor:dynamic:asym", "int8:token:dynamic"])
def test_bert_joined_qkv_product_equals_the_separate_products(bert_dir, weights, inputs):
    rules = (f"*.attention.self.*={inputs}",)
    loaded, fused, _ = _build_bert(bert_dir, True, weights=weights, act_rules=rules, token_linears=0)
    _, separate, _ = _build_bert(bert_dir, False, weights=weights, act_rules=rules, token_linears=0)
    # one product per layer for q|k|v, split into the three outputs; each module keeps its named constants
    assert len(_products(fused)) == len(_products(separate)) - 2 * LAYERS
    assert Counter(n.op_type for n in fused.graph.node)["Split"] == LAYERS
    names = {i.name for i in fused.graph.initializer}
    for layer in range(LAYERS):
        for part in QKV:
            assert {f"encoder.layer.{layer}.attention.self.{part}.{k}" for k in ("codes", "scale", "zero_point")} <= names

    feeds = _feeds(loaded.tokenizer, fused)
    joined = {name: out for name, out in _products(fused).items() if "+" in name}
    assert len(joined) == LAYERS
    got = _session(_with_outputs(fused, list(joined.values())), optimize=False).run(None, feeds)
    joined_values = dict(zip(joined, got[1:]))
    alone = {name.split("/")[0]: out for name, out in _products(separate).items()}
    want = _session(_with_outputs(separate, list(alone.values())), optimize=False).run(None, feeds)
    alone_values = dict(zip(alone, want[1:]))
    widths = {m: v.shape[-1] for m, v in alone_values.items()}
    for layer in range(LAYERS):
        for part in QKV:
            module = f"encoder.layer.{layer}.attention.self.{part}"
            np.testing.assert_array_equal(_columns(joined_values, module, widths), alone_values[module])
    np.testing.assert_array_equal(got[0], want[0])  # the embeddings, bit for bit
    # with every onnxruntime optimization (DynamicQuantizeMatMul + Split against three products)
    optimized = [_session(p, optimize=True).run(None, feeds)[0] for p in (fused, separate)]
    np.testing.assert_allclose(optimized[0], optimized[1], rtol=1e-5, atol=1e-6 * np.abs(optimized[1]).max())


def test_bert_residual_sums_and_token_bias_rows_keep_the_numbers_and_avoid_slow_fusions(bert_dir, tmp_path):
    rules = ("encoder.layer.0.intermediate.dense=int8:token:dynamic", "encoder.layer.1.output.dense=int8:token:dynamic")
    loaded, ours, _ = _build_bert(bert_dir, False, act_rules=rules, token_linears=0)
    _, plain, _ = _build_bert(bert_dir, False, act_rules=rules, token_linears=0, residual_sums=False)
    # the embeddings' and 2 per layer residual Adds are Sums; the plain graph keeps them as Add
    assert Counter(n.op_type for n in ours.graph.node)["Sum"] == 1 + 2 * LAYERS
    assert Counter(n.op_type for n in plain.graph.node)["Sum"] == 0
    shapes = {i.name: tuple(i.dims) for i in ours.graph.initializer}
    for module in ("encoder.layer.0.intermediate.dense", "encoder.layer.1.output.dense"):  # per-token biases: rows
        assert len(shapes[f"{module}.bias"]) == 2 and shapes[f"{module}.bias"][0] == 1
    feeds = _feeds(loaded.tokenizer, ours)
    exact = [_session(p, optimize=False).run(None, feeds)[0] for p in (ours, plain)]
    np.testing.assert_array_equal(exact[0], exact[1])
    _session(ours, optimize=True, path=tmp_path / "ours.onnx").run(None, feeds)
    fused_ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "ours.onnx")).graph.node)
    assert fused_ops["SkipLayerNormalization"] == 0 and fused_ops["BiasGelu"] == 0
    assert fused_ops["LayerNormalization"] == 1 + 2 * LAYERS and fused_ops["Gelu"] == LAYERS
    _session(plain, optimize=True, path=tmp_path / "plain.onnx")
    plain_ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "plain.onnx")).graph.node)
    assert plain_ops["BiasGelu"] == 0 and plain_ops["SkipLayerNormalization"] > 0


def test_bert_per_row_embedding_lookups_decode_exactly(bert_dir):
    loaded, proto, quantized = _build_bert(bert_dir, True, token_linears=0)
    readers = {name: n for n in proto.graph.node for name in n.input}
    # each table's rows: DequantizeLinear along axis 0, reshaped to the indices' shape + (dim,)
    lookups = {n.name.split("/")[0]: readers[n.output[0]].output[0] for n in proto.graph.node
               if n.op_type == "DequantizeLinear"}
    assert set(lookups) == {"embeddings.word_embeddings", "embeddings.position_embeddings",
                            "embeddings.token_type_embeddings"}
    assert Counter(n.op_type for n in proto.graph.node)["DequantizeLinear"] == 3
    feeds = _feeds(loaded.tokenizer, proto)
    names = list(lookups)
    got = _session(_with_outputs(proto, [lookups[n] for n in names]), optimize=True).run(None, feeds)[1:]
    ids = {"embeddings.word_embeddings": feeds["input_ids"], "embeddings.token_type_embeddings": feeds["token_type_ids"],
           "embeddings.position_embeddings": np.arange(feeds["input_ids"].shape[1])[None]}
    for name, rows in zip(names, got):
        table = dequantize(quantized.qtensors[f"{name}.weight"]).numpy()
        np.testing.assert_array_equal(rows, table[ids[name]])


def _llama_graph(fuse: bool):
    """A tiny Llama, W8A8 (int7 weights per channel, int8 inputs per token) and int8 embedding rows, lowered."""
    model = lowbit_model("llama")
    recipe = onnx_recipe(OnnxExportOptions(method="rtn", activations="int8:token:dynamic", weights="int7:channel"))
    quantized = quantize_model(model, recipe, progress=False)
    proto = trace_lm(quantized.model, kv_cache=False)
    lowering = lower_quantized(proto, quantized, integer=True, fuse=fuse)
    onnx.checker.check_model(proto, full_check=True)
    return proto, lowering


def test_llama_joined_qkv_and_gate_up_products_equal_the_separate_products():
    fused, lowering = _llama_graph(fuse=True)
    separate, _ = _llama_graph(fuse=False)
    assert {how for name, how in lowering.items() if name != "model.embed_tokens"} == {"int8"}
    joined = {name: out for name, out in _products(fused).items() if "+" in name}
    assert len(joined) == 2 * LAYERS and all(name.count("+") in (1, 2) for name in joined)  # q+k+v, gate+up
    assert Counter(n.op_type for n in fused.graph.node)["Split"] == 2 * LAYERS
    feeds = {"input_ids": torch.randint(3, 512, (2, 19), generator=torch.Generator().manual_seed(0)).numpy()}
    got = _session(_with_outputs(fused, list(joined.values())), optimize=False).run(None, feeds)
    alone = {name.split("/")[0]: out for name, out in _products(separate).items()}
    want = _session(_with_outputs(separate, list(alone.values())), optimize=False).run(None, feeds)
    alone_values = dict(zip(alone, want[1:]))
    widths = {m: v.shape[-1] for m, v in alone_values.items()}
    joined_values = dict(zip(joined, got[1:]))
    members = [m for name in joined for m in name.split("/")[0].split("+")]
    assert len(members) == 5 * LAYERS
    for module in members:
        np.testing.assert_array_equal(_columns(joined_values, module, widths), alone_values[module])
    np.testing.assert_array_equal(got[0], want[0])  # logits, bit for bit
    optimized = [_session(p, optimize=True).run(None, feeds)[0] for p in (fused, separate)]
    np.testing.assert_allclose(optimized[0], optimized[1], rtol=1e-5, atol=1e-5 * np.abs(optimized[1]).max())


def _linear(module: str, x: str, act: str, weight_spec: str = "int7:channel") -> IntegerLinear:
    site = LinearSite(module, f"{module}/MatMul", x, f"{module}.w", None, None, f"{module}/out")
    weight = onnx_weight(quantize(torch.randn(8, 16), parse_spec(weight_spec)), transpose=True)
    return IntegerLinear(site, weight, parse_activation_spec(act))


def test_groups_need_the_same_input_spec_and_weight_kernel():
    asym, token = "int8:tensor:dynamic:asym", "int8:token:dynamic"
    linears = [_linear("q", "x", asym), _linear("k", "x", asym), _linear("v", "x", asym, "int8:channel"),
               _linear("t", "x", token), _linear("u", "y", asym), _linear("w", "x", asym)]
    groups = [[linear.site.module for linear in group] for group in shared_input_groups(linears)]
    # full 8-bit codes take the uint8 kernel: not joined with int7 codes; another spec or input: another group
    assert groups == [["q", "k", "w"], ["v"], ["t"], ["u"]]


def test_residual_sums_leave_bias_adds_alone():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    r = helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    bias, gamma = (helper.make_tensor(n, TensorProto.FLOAT, [4], [0.5] * 4) for n in ("bias", "gamma"))
    nodes = [helper.make_node("Add", ["x", "bias"], ["xb"]), helper.make_node("LayerNormalization", ["xb", "gamma"], ["n"]),
             helper.make_node("Add", ["n", "r"], ["s"]), helper.make_node("LayerNormalization", ["s", "gamma"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x, r], [y], [bias, gamma])
    assert residual_sums(graph) == 1
    assert [n.op_type for n in graph.node] == ["Add", "LayerNormalization", "Sum", "LayerNormalization"]
