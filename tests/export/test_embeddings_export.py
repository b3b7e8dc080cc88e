"""Checkpoints with a quantized token embedding (and head) through every consumer: ``lowbit eval``, the Hugging
Face exporters (which write the table dequantized, as their loaders need, and say so) and ONNX (which gathers
rows of the stored codes and lowers a tied head from the same codes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lowbit.cli import main
from lowbit.export.compressed_tensors import export_hf
from lowbit.export.gptq import export_gptq_folder
from lowbit.formats import dequantize
from lowbit.model.checkpoint import load_checkpoint, read_qtensors
from tests.arch_models import save_tiny
from tests.export.helpers import quantize_folder

EVAL = ["--windows", "2", "--window-length", "64", "--json"]


@pytest.fixture(scope="module")
def int8_embedding_ckpt(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny (tied) Llama at W4A16 g32 with the default embedding handling: int8 rows."""
    out = tmp_path_factory.mktemp("emb") / "lowbit"
    assert main(["quantize", str(tiny_llama_dir), "--scheme", "W4A16", "--group-size", "32", "--out", str(out),
                 "--no-eval", "--json"]) == 0
    return out


def test_eval_of_an_int8_embedding_checkpoint(int8_embedding_ckpt, capsys):
    report = json.loads((int8_embedding_ckpt / "report.json").read_text())
    assert report["embeddings"] == "int8:channel (default: 25% of weights)"
    capsys.readouterr()
    assert main(["eval", str(int8_embedding_ckpt), *EVAL]) == 0
    metrics = json.loads(capsys.readouterr().out)["eval"]
    assert 0 < metrics["kld"] < 1 and metrics["top1"] > 0.3


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_hf_export_writes_the_table_dequantized_and_transformers_agrees(int8_embedding_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    summary = export_hf(int8_embedding_ckpt, tmp_path / "ct")
    assert summary["dequantized"] == ["model.embed_tokens.weight"] and summary["quantized"] == 14
    manifest = json.loads((tmp_path / "ct" / "lowbit_export.json").read_text())
    assert manifest["dequantized"] == {"model.embed_tokens.weight": "int8:channel"}
    qt = read_qtensors(int8_embedding_ckpt / "model.safetensors")[0]["model.embed_tokens.weight"]
    stored = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert torch.equal(stored["model.embed_tokens.weight"], dequantize(qt).half())
    assert not any(k.startswith("lm_head") for k in stored)  # tied: transformers re-ties the head
    ours, _, _ = load_checkpoint(int8_embedding_ckpt)
    with torch.no_grad():  # the export holds the table in fp16, as noted in its manifest
        ours.model.embed_tokens.weight.copy_(ours.model.embed_tokens.weight.half().float())
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)
    gptq = export_gptq_folder(int8_embedding_ckpt, tmp_path / "gptq")
    assert gptq["dequantized"] == ["model.embed_tokens.weight"]


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_untied_quantized_head_is_dequantized_for_hf(tmp_path):
    from transformers import AutoModelForCausalLM

    src = save_tiny("llama", tmp_path / "src")  # untied head
    ckpt = quantize_folder(src, tmp_path / "lowbit", ["--scheme", "W4A16", "--group-size", "32",
                                                     "--embeddings", "int4", "--lm-head", "int8"])
    report = json.loads((ckpt / "report.json").read_text())
    assert report["embeddings"] == "int4:g32 (--embeddings)" and report["lm_head"] == "int8:channel (--lm-head)"
    summary = export_hf(ckpt, tmp_path / "ct")
    assert summary["dequantized"] == ["lm_head.weight", "model.embed_tokens.weight"]
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["lm_head"]  # vLLM builds the head unquantized: it must read a float table
    ours, _, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        for p in (ours.model.embed_tokens.weight, ours.lm_head.weight):
            p.copy_(p.half().float())
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)


def test_onnx_export_gathers_codes_and_lowers_the_tied_head_from_them(int8_embedding_ckpt, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    assert main(["export", "onnx", str(int8_embedding_ckpt), "--accuracy-level", "0", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["lowering"]["model.embed_tokens"] == "qdq" and summary["lowering"]["lm_head"] == "qdq"
    proto = onnx.load(str(out))
    big_floats = [i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
                  and int(np.prod(i.dims)) >= 512 * 96]
    assert big_floats == []  # no float copy of the table: both uses read int8 codes
    from lowbit.eval.onnxruntime_lm import OnnxCausalLM

    lm = OnnxCausalLM(out, config={"session.qdq_matmulnbits_accuracy_level": "0"})  # KV graph, empty past
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(2))
    ours, _, _ = load_checkpoint(int8_embedding_ckpt)
    with torch.no_grad():
        expected = ours(ids).logits.numpy()
    got = lm.run(ids.numpy())[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
