"""lowbit qat end to end on tiny random models of two families: distillation lowers the KLD from the PTQ start,
the result is an ordinary checkpoint, an interrupted run resumes to the same bytes, and bad input stops with
one line and nothing half-written."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.model.checkpoint import load_checkpoint
from lowbit.training import loop
from lowbit.training.blockwise import BlockOptions
from lowbit.training.loop import TrainOptions
from lowbit.workflow import EvalOptions, QuantizeOptions, eval_job
from lowbit.workflow_qat import QATOptions, qat_job
from tests.arch_models import save_tiny

EVAL = EvalOptions(windows=2, length=64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return {family: save_tiny(family, tmp_path_factory.mktemp(f"qat-{family}") / "hf") for family in ("llama", "qwen2")}


def _options(model: Path, out: Path, **train) -> QATOptions:
    settings = dict(steps=6, batch_windows=2, micro_batch=1, warmup_steps=1, eval_every=3, checkpoint_every=2,
                    lr_weights=1e-3, lr_quant=1e-3, dtype="fp32") | train
    return QATOptions(quantize=QuantizeOptions(model=str(model), scheme="W2A16", group_size=32, symmetric=False,
                                               out=str(out), eval=EVAL),
                      train=TrainOptions(**settings), length=64)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_qat_lowers_the_kld_and_writes_an_ordinary_checkpoint(tmp_path, folders, family):
    opts = replace(_options(folders[family], tmp_path / "out", steps=40, lr_weights=3e-3), blocks=None)
    report, out = qat_job(opts, progress=False)  # end to end only
    start, end = report["qat"]["start_eval"]["kld"], report["eval"]["kld"]
    assert end < 0.85 * start, (start, end)
    assert report["qat"]["steps_done"] == 40 and report["qat"]["trained_tensors"] >= 14
    assert report["qat"]["blocks"] is None
    monitors = [h["monitor_kld"] for h in report["qat"]["history"] if "monitor_kld" in h]
    assert monitors[-1] < monitors[0]
    # the checkpoint, reloaded and re-evaluated as any lowbit output, computes what the report measured
    again = eval_job(out, EVAL, progress=False)
    assert again["eval"]["kld"] == pytest.approx(end, rel=1e-4)
    model, _, manifest = load_checkpoint(out)
    assert manifest["qat"] is True and manifest["spec"] == "int2:g32:asym"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_block_wise_phase_runs_first_by_default_and_lowers_the_kld(tmp_path, folders, family):
    opts = _options(folders[family], tmp_path / "out", steps=2)
    assert opts.blocks == BlockOptions()  # on unless asked otherwise
    report, _ = qat_job(opts, progress=False)
    start, end = report["qat"]["start_eval"]["kld"], report["eval"]["kld"]
    assert end < start, (start, end)  # tiny random models gain little; the default model: bench/RESULTS_qat.md
    blocks = report["qat"]["blocks"]  # every block, each closer to the original's output than at the start
    assert len(blocks) == 2 and all(b["rel_mse_after"] < b["rel_mse_before"] for b in blocks), blocks
    assert report["seconds"]["blocks"] > 0


def test_resume_after_an_interruption_writes_the_same_bytes(tmp_path, folders, monkeypatch):
    model = folders["llama"]
    _, straight = qat_job(_options(model, tmp_path / "straight"), progress=False)

    calls = {"n": 0}
    real = loop._accumulate

    def dies_at_step_four(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_accumulate", dies_at_step_four)
    opts = _options(model, tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        qat_job(opts, progress=False)
    assert not (tmp_path / "resumed").exists()
    state = json.loads((tmp_path / "resumed.qat-state" / "state.json").read_text())
    assert state["step"] == 2
    monkeypatch.setattr(loop, "_accumulate", real)
    report, resumed = qat_job(replace(opts, resume=True), progress=False)
    assert report["qat"]["steps_done"] == 6
    assert (straight / "model.safetensors").read_bytes() == (resumed / "model.safetensors").read_bytes()


def test_resume_refuses_a_state_made_for_other_options(tmp_path, folders):
    opts = _options(folders["llama"], tmp_path / "a", steps=2)
    qat_job(opts, progress=False)
    changed = replace(opts, train=replace(opts.train, lr_weights=5e-4), resume=True,
                      quantize=replace(opts.quantize, force=True))
    with pytest.raises(LowbitError, match="another model, recipe, data or options"):
        qat_job(changed, progress=False)


def test_a_nan_loss_stops_with_the_last_good_state_kept(tmp_path, folders, monkeypatch):
    calls = {"n": 0}
    real = loop.distillation_loss

    def nan_at_step_three(*args, **kwargs):  # calls: 2 monitor windows, then 2 micro-batches per step
        calls["n"] += 1
        loss, kl = real(*args, **kwargs)
        return (loss * float("nan"), kl) if calls["n"] == 7 else (loss, kl)

    monkeypatch.setattr(loop, "distillation_loss", nan_at_step_three)
    with pytest.raises(LowbitError, match=r"loss became nan at step 3.*step 2"):
        qat_job(_options(folders["llama"], tmp_path / "out", eval_every=100), progress=False)
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / "out.qat-state" / "state.json").read_text())["step"] == 2


def test_no_gradient_through_a_quantized_layer_is_refused(tmp_path, folders):
    from lowbit.formats.quantize import quantize
    from lowbit.formats.spec import parse_spec
    from lowbit.training.fake_quant import QATLinear
    from tests.arch_models import tiny_model

    teacher = tiny_model("llama")
    student = tiny_model("llama")
    for block in student.model.layers:
        qt = quantize(block.mlp.down_proj.weight, parse_spec("int4:g32"))
        block.mlp.down_proj = QATLinear.from_qtensor(qt, block.mlp.down_proj.weight.data)
    student.model.layers[1].mlp.forward = lambda x: torch.zeros_like(x)  # the layer never reaches the loss
    windows = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(LowbitError, match="no gradient through 1 quantized layer.*layers.1.mlp.down_proj"):
        loop.train(student, teacher, windows, windows[:1], TrainOptions(steps=1, batch_windows=2, micro_batch=1,
                   dtype="fp32"), tmp_path / "state", "x", progress=False)


@pytest.mark.parametrize("args,message", [
    (["--scheme", "NF4"], "QAT cannot train nf4"),
    (["--method", "smoothquant"], "QAT starts from"),
    (["--batch", "100000"], "fewer than one batch"),
    (["--batch", "3", "--micro-batch", "2"], "multiple of --micro-batch"),
    (["--steps", "0"], "must be positive"),
    (["--block-epochs", "-1"], "--block-epochs must be 0 or more"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, folders, capsys, args, message):
    out = tmp_path / "out"
    code = main(["qat", str(folders["llama"]), "--out", str(out), "--windows", "2", "--window-length", "64",
                 "--train-length", "64", "--no-eval", "--steps", "2", "--dtype", "fp32", *args[:]]
                if "--steps" not in args else
                ["qat", str(folders["llama"]), "--out", str(out), "--no-eval", *args])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("lowbit: error:") and message in errors[0], errors
    assert not out.exists()


def test_ternary_qat_on_gguf_twins_is_written_to_tq2_as_trained(tmp_path):
    from lowbit.eval.llamacpp import gguf_logprobs
    from lowbit.export.gguf import export_gguf_checkpoint
    from lowbit.gguf.convert import GGUFExportOptions

    hf = save_tiny("qwen2", tmp_path / "hf", hidden_size=256, intermediate_size=512)
    opts = replace(_options(hf, tmp_path / "qat", steps=8, lr_weights=3e-3), gguf_type="TQ2_0")
    report, out = qat_job(opts, progress=False)
    assert report["eval"]["kld"] < report["qat"]["start_eval"]["kld"]
    heads = (("token_embd.weight", "F32"), ("output.weight", "F32"))
    summary = export_gguf_checkpoint(out, GGUFExportOptions(type="TQ2_0", types=heads, out=str(tmp_path / "t.gguf")))
    assert summary["exact_from_codes"] == 14 and summary["tensor_types"]["TQ2_0"] == 14
    model, _, _ = load_checkpoint(out)
    ids = torch.randint(3, 500, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    got = gguf_logprobs(summary["path"], ids)[0]
    assert float((ref.exp() * (ref - got)).sum(-1).mean()) < 5e-3  # llama.cpp's int8 activations only


def test_compressed_tensors_and_onnx_exporters_write_a_qat_checkpoint(tmp_path, folders):
    """The trained checkpoint is ordinary: transformers loads its compressed-tensors folder and onnxruntime runs
    its MatMulNBits graph, both computing what lowbit's own reload of the checkpoint computes."""
    import numpy as np
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from lowbit.eval.onnxruntime_lm import OnnxCausalLM
    from lowbit.export.compressed_tensors import export_hf
    from tests.export.test_compressed_tensors import _round_like_compressed_tensors
    from lowbit.export.onnx_checkpoint import OnnxCheckpointOptions, export_onnx_checkpoint

    opts = _options(folders["qwen2"], tmp_path / "qat", steps=4)
    opts = replace(opts, quantize=replace(opts.quantize, scheme="W4A16", group_size=32, symmetric=True, embeddings="keep"))
    _, out = qat_job(opts, progress=False)
    ours, _, _ = load_checkpoint(out)
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
    export_hf(out, tmp_path / "ct")
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    _round_like_compressed_tensors(ours, out)  # it dequantizes in the scales' dtype (fp16)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    summary = export_onnx_checkpoint(OnnxCheckpointOptions(str(out), str(tmp_path / "q.onnx"), accuracy_level=0))
    assert list(summary["lowering"].values()).count("matmulnbits") == 14  # the blocks; the int8 head: QDQ
    lm = OnnxCausalLM(tmp_path / "q.onnx", threads=1, config={"session.qdq_matmulnbits_accuracy_level": "0"})
    got = lm.run(ids.numpy())[0]  # the whole window, empty past
    assert np.abs(got - expected.numpy()).max() < 1e-4 * max(1.0, float(expected.abs().max()))
