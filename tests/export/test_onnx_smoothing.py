"""SmoothQuant input scaling in the int8 ONNX export, on two encoder families (BERT, XLM-RoBERTa) whose
attention LayerNorms are given outlier channels (as trained transformers have): the measured choice smooths
the intermediate denses that read those outliers, leaves the model bit for bit as it was while measuring, the
graph scales their inputs by a constant Mul before the integer product, onnxruntime reproduces lowbit's
fake-quant model. (Whether smoothing pays on a real model is measured in bench/onnx_minilm.py; in these tiny
random models activation rounding hardly moves the embeddings either way.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from lowbit.eval.encoder import embed  # noqa: E402
from lowbit.export.onnx import OnnxExportOptions, build_onnx, calibration_sentences, onnx_recipe  # noqa: E402
from lowbit.export.onnx_sensitivity import choose_smoothing, linear_names, per_tensor_losses  # noqa: E402
from lowbit.formats.activation import parse_activation_spec  # noqa: E402
from lowbit.model.load import load_model  # noqa: E402
from lowbit.transforms.input_smoothing import input_smoothings  # noqa: E402
from tests.arch_models import save_tiny  # noqa: E402

FAMILIES = ("bert", "xlm-roberta")
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "def f(x): return x + 1",
             "Numbers like 3.14159 and 2.71828 show up in many places.", "short",
             "A somewhat longer sentence, with commas, clauses, and a few more tokens than the others have."]
FAST = dict(method="rtn", calib_samples=4, calib_length=32, sensitivity_sentences=16, token_linears=0)
OUTLIERS = (5, 41)


@pytest.fixture(scope="module", params=FAMILIES)
def encoder_dir(request, tmp_path_factory):
    """A tiny encoder whose attention LayerNorms scale two channels by 80: outliers in every intermediate
    dense's input (and in the residual stream, as in trained BERTs)."""
    from safetensors.torch import load_file, save_file

    path = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    weights = load_file(str(path / "model.safetensors"))
    for name in weights:
        if name.endswith("attention.output.LayerNorm.weight"):
            weights[name][list(OUTLIERS)] *= 80.0
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _intermediates(model) -> list[str]:
    return [name for name, _ in model.named_modules() if name.endswith("intermediate.dense")]


def test_choice_smooths_the_outlier_inputs_and_leaves_the_model_unchanged(encoder_dir):
    loaded = load_model(str(encoder_dir))
    opts = OnnxExportOptions(model=str(encoder_dir), **FAST)
    names = linear_names(loaded.model, onnx_recipe(opts))
    sentences = calibration_sentences(opts)[:16]
    spec = parse_activation_spec("int8:tensor:dynamic:asym")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    losses = per_tensor_losses(loaded.model, loaded.tokenizer, sentences, names, spec)
    chosen, after = choose_smoothing(loaded.model, loaded.tokenizer, sentences, names, spec, losses)
    assert set(_intermediates(loaded.model)) <= set(chosen)
    assert not any(part in name for name in chosen for part in ("query", "key", "value"))  # they share an input
    for name in chosen:
        assert after[name] <= 0.5 * losses[name]
        assert chosen[name].shape == (loaded.model.get_submodule(name).in_features,)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert input_smoothings(loaded.model) == {}


def _embeddings_of(proto, tokenizer) -> np.ndarray:
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    names = [i.name for i in proto.graph.input]
    feeds = {n: batch[n].astype(np.int64) if n in batch else np.zeros_like(batch["input_ids"], np.int64)
             for n in names}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_int8_graph_scales_the_inputs_and_matches_the_fake_quant_model(encoder_dir):
    for smooth in (True, False):
        loaded = load_model(str(encoder_dir))
        proto, quantized, lowering = build_onnx(loaded, OnnxExportOptions(model=str(encoder_dir), smooth=smooth,
                                                                          **FAST))
        onnx.checker.check_model(proto, full_check=True)
        smoothings = input_smoothings(quantized.model)
        assert bool(smoothings) == smooth
        got = _embeddings_of(proto, loaded.tokenizer)
        ours = embed(quantized.model, loaded.tokenizer, SENTENCES, progress=False).numpy()
        assert _cosine(got, ours).min() > 0.9999
        np.testing.assert_allclose(got, ours, atol=2e-3 * np.abs(ours).max())
        if smooth:
            inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
            producers = {out: node for node in proto.graph.node for out in node.output}
            for name, smoothing in smoothings.items():
                assert lowering[name] == "int8"
                constant = smoothing.inverse_scale.numpy()
                muls = [n for n in proto.graph.node if n.op_type == "Mul"
                        and any(i in inits and inits[i].shape == constant.shape
                                and np.array_equal(inits[i], constant) for i in n.input)]
                assert len(muls) == 1, name
                quantizers = [n for n in proto.graph.node if muls[0].output[0] in n.input]
                assert [n.op_type for n in quantizers] == ["DynamicQuantizeLinear"], name
                if name.endswith("intermediate.dense"):  # reads the attention LayerNorm's output
                    assert producers[muls[0].input[0]].op_type == "LayerNormalization"
