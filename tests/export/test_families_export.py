"""compressed-tensors and ONNX export of a W4A16 (int4, groups of 32) checkpoint of a tiny random model of
every family in lowbit's architecture table (tests/arch_models.py), each checked by its real consumer
against lowbit's fake-quant model (``load_checkpoint``):

- ``lowbit export hf``: transformers ``from_pretrained`` (float32, compressed-tensors' default route)
  gives our logits (encoders: last hidden states) to the 1e-5 of tests/export/test_compressed_tensors.py.
  GPT-2 is refused in one line with nothing written: lowbit quantizes its ``Conv1D`` projections as
  linears, but transformers builds them as ``Conv1D`` again and compressed-tensors decompresses only
  ``nn.Linear``.
- ``lowbit export onnx``: onnxruntime gives our logits (encoders: the graph's mean-pooled embedding) to the
  1e-4 (relative to the largest logit) of tests/export/test_onnx_checkpoint.py, every quantized linear of
  the graph lowered to one MatMulNBits (biases included: Qwen2's q/k/v, BERT's, GPT-2's).

Windows are 90 tokens, longer than the tiny Gemmas' sliding window (64), so the sliding-window masks are
part of what is compared. The token embedding and the output head stay in float (``--embeddings keep
--lm-head keep``): these tests check the families' linears; quantized embeddings are covered elsewhere.
Each family's checkpoint is built once (module-scoped fixture) with a one-window evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.arch import family_of
from lowbit.cli import main
from lowbit.model.checkpoint import load_checkpoint, read_qtensors
from tests.arch_models import DECODERS, ENCODERS, save_tiny, tiny_config
from tests.export.helpers import assert_export_refused

FAMILIES = DECODERS + ENCODERS
CONV1D_FAMILIES = tuple(f for f in FAMILIES if family_of(tiny_config(f)).transposed_linear)
CT_FAMILIES = tuple(f for f in FAMILIES if f not in CONV1D_FAMILIES)
QUANTIZE_ARGS = ["--scheme", "W4A16", "--group-size", "32", "--embeddings", "keep", "--lm-head", "keep",
                 "--windows", "1", "--window-length", "64", "--sentences", "8"]
SEQUENCE = 90  # > the tiny Gemmas' sliding window of 64


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (tiny HF folder, lowbit W4A16 checkpoint), made on first use."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            source = save_tiny(family, root / "hf")
            assert main(["quantize", str(source), *QUANTIZE_ARGS, "--out", str(root / "q"), "--json"]) == 0
            made[family] = (source, root / "q")
        return made[family]

    return get


def _inputs(family: str) -> dict[str, torch.Tensor]:
    """Two windows of SEQUENCE random tokens; encoders get an attention mask padding the second one."""
    ids = torch.randint(3, 512, (2, SEQUENCE), generator=torch.Generator().manual_seed(0))
    if family in DECODERS:
        return {"input_ids": ids}
    mask = torch.ones_like(ids)
    mask[1, -25:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _output(model: torch.nn.Module, family: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if family in DECODERS else out.last_hidden_state


def _quantized_linears(ckpt: Path) -> set[str]:
    qtensors, _ = read_qtensors(ckpt / "model.safetensors")
    return {p.removesuffix(".weight") for p in qtensors}


@pytest.mark.parametrize("family", CT_FAMILIES)
def test_compressed_tensors_folder_loads_in_transformers_and_agrees(checkpoints, tmp_path, capsys, family):
    from transformers import AutoModel, AutoModelForCausalLM

    source, ckpt = checkpoints(family)
    out = tmp_path / "ct"
    capsys.readouterr()
    assert main(["export", "hf", str(ckpt), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "compressed-tensors:pack-quantized" and summary.get("dequantized", []) == []
    assert summary["quantized"] == len(_quantized_linears(ckpt)) >= 8
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert qc["ignore"] == (["lm_head"] if family in DECODERS else [])

    auto = AutoModelForCausalLM if family in DECODERS else AutoModel
    theirs = auto.from_pretrained(str(out), dtype=torch.float32).eval()
    ours, _, _ = load_checkpoint(ckpt)
    original = auto.from_pretrained(str(source), dtype=torch.float32).eval()
    inputs = _inputs(family)
    expected, got = _output(ours, family, inputs), _output(theirs, family, inputs)
    assert got.shape == expected.shape and expected.abs().max() > 0.1
    # int4 visibly changes the outputs, so agreeing to 1e-5 means transformers computed with our int4 weights
    assert (_output(original, family, inputs) - expected).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    diff = (got - expected).abs().max().item()
    print(f"{family}: compressed-tensors max |diff| {diff:.3g} (largest output {expected.abs().max().item():.3g})")


@pytest.mark.parametrize("family", CONV1D_FAMILIES)
def test_compressed_tensors_refuses_conv1d_families(checkpoints, tmp_path, capsys, family):
    _, ckpt = checkpoints(family)
    out = tmp_path / "exports" / "ct"
    assert_export_refused(["export", "hf", str(ckpt), "--out", str(out)], tmp_path / "exports", capsys,
                          "projections are transformers Conv1D layers, not nn.Linear")
    assert not out.exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_graph_runs_in_onnxruntime_and_agrees(checkpoints, tmp_path, capsys, family):
    ort = pytest.importorskip("onnxruntime")

    _, ckpt = checkpoints(family)
    path = tmp_path / "q.onnx"
    capsys.readouterr()
    assert main(["export", "onnx", str(ckpt), "--accuracy-level", "0", "--out", str(path), "--json"]) == 0
    lowering = json.loads(capsys.readouterr().out)["lowering"]
    in_graph = {m: how for m, how in lowering.items() if how != "absent"}
    assert set(lowering) == _quantized_linears(ckpt)
    assert set(in_graph.values()) == {"matmulnbits"} and len(in_graph) >= 8
    assert set(lowering) - set(in_graph) <= {"pooler.dense"}  # BERT's pooler: not on the mean-pooled path

    inputs = _inputs(family)
    if family in DECODERS:  # a KV-cache graph (sliding-window families: whole-window), run with an empty past
        from lowbit.eval.onnxruntime_lm import OnnxCausalLM

        lm = OnnxCausalLM(path, config={"session.qdq_matmulnbits_accuracy_level": "0"})
        got = lm.run(inputs["input_ids"].numpy())[0]
    else:
        options = ort.SessionOptions()
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        feeds = {n: inputs[n].numpy() if n in inputs else np.zeros_like(inputs["input_ids"].numpy()) for n in names}
        got = session.run(None, feeds)[0]
    model, _, _ = load_checkpoint(ckpt)
    expected = _output(model, family, inputs)
    if family in ENCODERS:  # the graph's output: the attention-masked mean of the last hidden states
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        expected = (expected * mask).sum(1) / mask.sum(1)
    expected = expected.numpy()
    assert got.shape == expected.shape and np.abs(expected).max() > 0.1
    diff = float(np.abs(got - expected).max())
    print(f"{family}: onnxruntime max |diff| {diff:.3g} (largest output {np.abs(expected).max():.3g})")
    assert diff < 1e-4 * max(1.0, float(np.abs(expected).max()))
