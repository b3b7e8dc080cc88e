import collections

import numpy as np
import onnx
from onnx import numpy_helper
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.vision.fold import fold_batchnorm  # noqa: E402
from lowbit.vision.freeze import freeze  # noqa: E402
from lowbit.vision.onnx_export import export_onnx  # noqa: E402
from lowbit.vision.ptq import calibrate, prepare, quantize_cnn  # noqa: E402
from lowbit.vision.resnet50 import resnet50  # noqa: E402
from lowbit.vision.train import accuracy, predict  # noqa: E402


def _run(path, x, optimized=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if optimized:
        so.optimized_model_filepath = str(optimized)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def _export_and_check_accuracy(digits, q, tmp_path):
    """Export ``q`` as QDQ ONNX, check onnxruntime's accuracy against PyTorch's (within 0.5 points); returns the
    optimized graph's op counts, the weight DequantizeLinear nodes and the file's initializers by name."""
    path = export_onnx(q, tmp_path / "digits_qdq.onnx", (1, 8, 8), "qdq", freeze(q))
    logits = _run(path, digits.test_x, optimized=tmp_path / "opt.onnx")
    ort_acc = 100.0 * float((logits.argmax(-1) == digits.test_y.numpy()).mean())
    assert abs(ort_acc - accuracy(q, digits.test_x, digits.test_y)) <= 0.5
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)
    graph = onnx.load(path).graph
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.name.endswith("/weight")]
    return ops, dq, {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def test_int8_qdq_runs_on_integer_kernels_with_the_same_accuracy(digits, digits_model, tmp_path):
    ops, dq, inits = _export_and_check_accuracy(digits, quantize_cnn(digits_model, "int8", digits.train_x[:512]),
                                                tmp_path)
    assert ops["QLinearConv"] == 8 and ops["Conv"] == 0, ops  # every conv runs on the int8 kernel
    assert dq and all(a.i == 0 for n in dq for a in n.attribute if a.name == "axis")
    # No weight can saturate the uint8 x int8 kernel of AVX2 CPUs without VNNI (pairs of products in 16 bits):
    # int8 codes stay within +-64, full 8-bit codes are stored as uint8 around zero point 128.
    for node in dq:
        codes, zero = inits[node.input[0]], inits[node.input[2]]
        assert codes.dtype == zero.dtype
        assert codes.dtype == np.uint8 and (zero == 128).all() or np.abs(codes.astype(int)).max() <= 64, node.name
    assert any(inits[n.input[0]].dtype == np.uint8 for n in dq)  # this model's 8-bit grids use the full range


def test_w7a8_keeps_int8_codes_for_the_fast_kernel_with_the_same_accuracy(digits, digits_model, tmp_path):
    ops, dq, inits = _export_and_check_accuracy(digits, quantize_cnn(digits_model, "w7a8", digits.train_x[:512]),
                                                tmp_path)
    codes = [inits[n.input[0]] for n in dq]
    assert codes and all(c.dtype == np.int8 and np.abs(c.astype(int)).max() <= 64 for c in codes)
    assert ops["QLinearConv"] == 8


def test_fp32_export_matches_torch(digits, digits_model, tmp_path):
    folded = fold_batchnorm(digits_model)
    path = export_onnx(folded, tmp_path / "digits_fp32.onnx", (1, 8, 8), "fp32")
    assert np.allclose(_run(path, digits.test_x[:64]), predict(digits_model, digits.test_x[:64]).numpy(), atol=1e-4)


def test_tiny_resnet50_shape_exports_fp32_fp16_int8(tmp_path):
    model = resnet50(width=8, stages=(1, 1, 1, 1), classes=10)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    folded = fold_batchnorm(model)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.allclose(_run(export_onnx(folded, tmp_path / "f32.onnx", (3, 32, 32), "fp32"), x), ref, atol=1e-4)
    half = export_onnx(folded, tmp_path / "f16.onnx", (3, 32, 32), "fp16")
    sess = ort.InferenceSession(str(half), providers=["CPUExecutionProvider"])
    out16 = sess.run(None, {"input": x.numpy().astype(np.float16)})[0].astype(np.float32)
    assert np.abs(out16 - ref).max() <= 0.02 * np.abs(ref).max()
    q = calibrate(prepare(model, "int8"), x, sequential=False)
    path = export_onnx(q, tmp_path / "i8.onnx", (3, 32, 32), "qdq", freeze(q))
    out = _run(path, x, optimized=tmp_path / "opt.onnx")
    with torch.no_grad():
        fake = q(x).numpy()
    assert np.abs(out - fake).max() <= 0.05 * np.abs(fake).max()  # requantization rounding in the kernels only
    assert collections.Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)["QLinearConv"] == 17


def test_w4a4_and_xnor_exports_are_refused_in_one_line(digits, digits_model, tmp_path):
    q = quantize_cnn(digits_model, "w4a4", digits.train_x[:64])
    with pytest.raises(LowbitError, match="8-bit activations"):
        export_onnx(q, tmp_path / "w4.onnx", (1, 8, 8), "qdq", freeze(q))
    with pytest.raises(LowbitError, match="needs the frozen"):
        export_onnx(q, tmp_path / "w4.onnx", (1, 8, 8), "qdq")
