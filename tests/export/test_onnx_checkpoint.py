"""Lowbit checkpoints (a tiny random Llama) as ONNX: MatMulNBits operands against a loop decoder written from
onnxruntime's operator spec, onnxruntime logits against the fake-quant model, compaction that changes no value."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lowbit.cli import main  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.export.onnx_checkpoint import OnnxCheckpointOptions, export_onnx_checkpoint  # noqa: E402
from lowbit.export.onnx_nbits import nbits_operands, nbits_ready  # noqa: E402
from lowbit.formats import dequantize, parse_spec, quantize  # noqa: E402
from lowbit.model.checkpoint import load_checkpoint  # noqa: E402
from tests.export.helpers import quantize_folder  # noqa: E402


def decode_matmulnbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, n: int, k: int,
                       bits: int, block: int) -> np.ndarray:
    """The [N, K] float weight MatMulNBits multiplies by, element by element (the operator spec as a loop)."""
    k_blocks = -(-k // block)
    zp_bytes_per_row = -(-k_blocks * bits // 8)
    flat_b = b.reshape(n, -1)
    out = np.zeros((n, k), np.float32)
    for row in range(n):
        for col in range(k):
            blk, within = divmod(col, block)
            bit = (blk * block + within) * bits
            code = (int(flat_b[row, bit // 8]) >> (bit % 8)) & ((1 << bits) - 1)
            if zero_points is None:
                zero = 1 << (bits - 1)
            else:
                zbit = blk * bits
                zero = (int(zero_points[row * zp_bytes_per_row + zbit // 8]) >> (zbit % 8)) & ((1 << bits) - 1)
            out[row, col] = np.float32(code - zero) * scales[row * k_blocks + blk]
    return out


@pytest.mark.parametrize("text", ["int4:g32", "int4:g64:asym", "int8:g16:asym", "int2:g32:asym", "int4:channel"])
def test_matmulnbits_operands_decode_to_our_weights(text):
    torch.manual_seed(0)
    cols = 64 if text.endswith("channel") else 80  # 80: a ragged last block
    q = quantize(torch.randn(6, cols), parse_spec(text))
    assert nbits_ready(q, has_input_quantizer=False)
    b, scales, zero_points = nbits_operands(q)
    block = q.spec.group_size or cols
    assert b.dtype == np.uint8 and b.shape == (6, -(-cols // block), block * q.spec.bits // 8)
    decoded = decode_matmulnbits(b, scales, zero_points, 6, cols, q.spec.bits, block)
    assert np.array_equal(decoded, dequantize(q).numpy())


@pytest.mark.parametrize("text", ["int3:g32", "int4:g48", "int4:g32:scale=e4m3", "nf4:g64"])
def test_specs_matmulnbits_cannot_hold_are_refused(text):
    q = quantize(torch.randn(4, 96), parse_spec(text))
    assert not nbits_ready(q, has_input_quantizer=False)


def _ort_logits(path: Path, ids: torch.Tensor) -> np.ndarray:
    from lowbit.eval.onnxruntime_lm import OnnxCausalLM

    # onnxruntime fuses DequantizeLinear(int4 blocks) + MatMul into its own MatMulNBits, by default at
    # accuracy level 4 (int8 activations); level 0 keeps the float computation the graph describes.
    # The graph has a KV cache: the whole window is run with an empty past.
    lm = OnnxCausalLM(path, config={"session.qdq_matmulnbits_accuracy_level": "0"})
    return lm.run(ids.numpy())[0]


@pytest.mark.parametrize("args, lowered", [
    (["--scheme", "W4A16", "--group-size", "32"], "matmulnbits"),
    (["--scheme", "W4A16", "--group-size", "64", "--asym", "--method", "gptq", "--calib-samples", "4",
      "--calib-length", "32"], "matmulnbits"),
    (["--scheme", "W8A8"], "int8"),
    (["--scheme", "W3A16", "--group-size", "32"], "qdq"),
])
def test_onnxruntime_logits_match_the_fake_quant_model(tiny_llama_dir, tmp_path, args, lowered):
    ckpt = quantize_folder(tiny_llama_dir, tmp_path / "q", args)
    summary = export_onnx_checkpoint(OnnxCheckpointOptions(str(ckpt), str(tmp_path / "q.onnx"), accuracy_level=0))
    assert set(summary["lowering"].values()) == {lowered} and len(summary["lowering"]) == 14
    model, _, _ = load_checkpoint(ckpt)
    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits.numpy()
    got = _ort_logits(tmp_path / "q.onnx", ids)
    assert got.shape == expected.shape
    # W8A8 rounds activations to int8: a last-bit difference before rounding can move a code by one step
    tolerance = 2e-2 if lowered == "int8" else 1e-4
    assert np.abs(got - expected).max() < tolerance * max(1.0, float(np.abs(expected).max()))


def test_tied_table_is_stored_once_in_fp16(tiny_llama_dir, tmp_path):
    ckpt = quantize_folder(tiny_llama_dir, tmp_path / "q", ["--scheme", "W4A16", "--group-size", "32"])
    export_onnx_checkpoint(OnnxCheckpointOptions(str(ckpt), str(tmp_path / "q.onnx"), accuracy_level=0))
    proto = onnx.load(str(tmp_path / "q.onnx"))
    tables = [i for i in proto.graph.initializer if list(i.dims) in ([512, 96], [96, 512])]
    assert len(tables) == 1 and tables[0].data_type == onnx.TensorProto.FLOAT16
    ops = {n.op_type for n in proto.graph.node}
    assert {"MatMulNBits", "Transpose", "Cast"} <= ops
    # the unshared float graph computes the same logits
    export_onnx_checkpoint(OnnxCheckpointOptions(str(ckpt), str(tmp_path / "f.onnx"), mode="float"))
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(2))
    assert np.abs(_ort_logits(tmp_path / "q.onnx", ids) - _ort_logits(tmp_path / "f.onnx", ids)).max() < 1e-4


def test_qdq_mode_writes_blocked_dequantize_linear(tiny_llama_dir, tmp_path):
    ckpt = quantize_folder(tiny_llama_dir, tmp_path / "q", ["--scheme", "W4A16", "--group-size", "32"])
    summary = export_onnx_checkpoint(OnnxCheckpointOptions(str(ckpt), str(tmp_path / "q.onnx"), mode="qdq"))
    assert set(summary["lowering"].values()) == {"qdq"}
    proto = onnx.load(str(tmp_path / "q.onnx"))
    blocked = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 32 for a in n.attribute)]
    assert len(blocked) == 14


def test_quantize_format_onnx_writes_a_folder_beside_thequantize_folder(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "w4"
    assert main(["quantize", str(tiny_llama_dir), "--scheme", "W4A16", "--group-size", "32", "--out", str(out),
                 "--no-eval", "--format", "lowbit,onnx"]) == 0
    folder = tmp_path / "w4-onnx"
    assert (folder / "model.onnx").is_file() and (folder / "tokenizer.json").is_file()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    assert "w4-onnx" in capsys.readouterr().out
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(3))
    model, _, _ = load_checkpoint(out)
    with torch.no_grad():
        expected = model(input_ids=ids).logits.numpy()
    # accuracy level 4 by default: int8 activations inside MatMulNBits, close to the fake-quant model, not equal
    levels = {a.i for n in onnx.load(str(folder / "model.onnx")).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    assert 0 < np.abs(_ort_logits(folder / "model.onnx", ids) - expected).max() < 0.05 * np.abs(expected).max()


def test_float_llm_cannot_be_quantized_by_the_encoder_path(tiny_llama_dir, tmp_path):
    from lowbit.export.onnx import OnnxExportOptions, export_onnx

    with pytest.raises(LowbitError, match="quantize it first"):
        export_onnx(OnnxExportOptions(model=str(tiny_llama_dir), out=str(tmp_path / "x.onnx"), mode="qdq",
                                      method="rtn", token_linears=0))
    assert not (tmp_path / "x.onnx").exists()
    summary = export_onnx(OnnxExportOptions(model=str(tiny_llama_dir), out=str(tmp_path / "f.onnx"), mode="float"))
    assert summary["bytes"] > 0


def test_cli_exports_a_checkpoint_with_int8_compute_kernels(tiny_llama_dir, tmp_path, capsys):
    ckpt = quantize_folder(tiny_llama_dir, tmp_path / "q", ["--scheme", "W4A16", "--group-size", "32"])
    capsys.readouterr()
    assert main(["export", "onnx", str(ckpt), "--out", str(tmp_path / "a4.onnx")]) == 0  # level 4: the default
    assert "14 matmulnbits" in capsys.readouterr().out
    proto = onnx.load(str(tmp_path / "a4.onnx"))
    levels = {a.i for n in proto.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {4}
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(4))
    exact = export_onnx_checkpoint(OnnxCheckpointOptions(str(ckpt), str(tmp_path / "a0.onnx"), accuracy_level=0))
    assert exact["lowered"] == {"matmulnbits": 14}
    a0, a4 = _ort_logits(tmp_path / "a0.onnx", ids), _ort_logits(tmp_path / "a4.onnx", ids)
    assert 0 < np.abs(a0 - a4).max() < 0.05 * np.abs(a0).max()  # int8 activations: close, not equal
    assert main(["export", "onnx", str(ckpt), "--accuracy-level", "4", "--out", str(tmp_path / "a4.onnx")]) == 2
    assert "already exists" in capsys.readouterr().err
