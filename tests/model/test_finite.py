"""NaN/Inf never reach a written model or a report: bad weights, quantized models whose forward goes non-finite,
non-finite evaluations, and bf16 calibration passes that overflow (recomputed in fp32)."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval.encoder import compare_embeddings
from lowbit.eval.lm import compare_lm, lm_reference
from lowbit.formats.qtensor import QTensor
from lowbit.formats.spec import parse_spec
from lowbit.model import finite
from lowbit.model.apply import quantize_model
from lowbit.observers.input_stats import InputStats
from lowbit.pipeline.calibrated import quantize_calibrated
from lowbit.recipe import Recipe, Rule
from tests.arch_models import save_tiny
from tests.conftest import make_tiny_llama

EVAL = ["--windows", "1", "--window-length", "32"]
CALIB = ["--calib-samples", "2", "--calib-length", "32", "--calib-batch", "2"]


def _run(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _assert_one_line_failure(code: int, err: str, match: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lowbit: error:")]
    assert code == 2, err
    assert len(lines) == 1 and match in lines[0], err
    return lines[0]


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "temporary output left behind"


def _with_tensor(src: Path, dst: Path, name: str, edit) -> Path:
    """A copy of the HF folder ``src`` whose safetensors tensor ``name`` is replaced by ``edit(tensor)``."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors[name] = edit(tensors[name].clone())
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _nan_at(t: torch.Tensor) -> torch.Tensor:
    t.view(-1)[3] = float("nan")
    return t


# ---- a checkpoint with NaN weights: one line, exit 2, nothing written -------------------------------------------

NAN_WEIGHT = "model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nan_weight_fails_cleanly(tmp_path, tiny_llama_dir, capsys, method):
    src = _with_tensor(tiny_llama_dir, tmp_path / "nan", NAN_WEIGHT, _nan_at)
    out = tmp_path / "out"
    code, err = _run(capsys, "quantize", src, "--method", method, "--out", out, *EVAL, *CALIB)
    _assert_one_line_failure(code, err, f"{NAN_WEIGHT} has 1 NaN/Inf values")
    _assert_nothing_written(out)


def test_nan_weight_gemma3_and_gguf_export(tmp_path, capsys):
    src = save_tiny("gemma3", tmp_path / "gemma3")
    bad = _with_tensor(src, tmp_path / "gemma3-nan", "model.layers.0.self_attn.k_proj.weight", _nan_at)
    out = tmp_path / "out"
    code, err = _run(capsys, "quantize", bad, "--out", out, *EVAL)
    _assert_one_line_failure(code, err, "model.layers.0.self_attn.k_proj.weight has 1 NaN/Inf")
    _assert_nothing_written(out)
    gguf_out = tmp_path / "bad.gguf"
    code, err = _run(capsys, "export", "gguf", bad, "--type", "Q8_0", "--method", "rtn", "--out", gguf_out)
    _assert_one_line_failure(code, err, "model.layers.0.self_attn.k_proj.weight has 1 NaN/Inf")
    _assert_nothing_written(gguf_out)


def test_gguf_export_refuses_weights_beyond_fp16(tmp_path, tiny_llama_dir, capsys):
    """Finite weights beyond 65504 would encode as inf F16 values or fp16 block scales: refused before encoding."""
    def huge(t):
        t.view(-1)[0] = 1e6
        return t

    src = _with_tensor(tiny_llama_dir, tmp_path / "huge", "model.layers.0.mlp.down_proj.weight", huge)
    out = tmp_path / "huge.gguf"
    code, err = _run(capsys, "export", "gguf", src, "--type", "Q8_0", "--method", "rtn", "--out", out)
    _assert_one_line_failure(code, err, "model.layers.0.mlp.down_proj.weight has values beyond fp16's range")
    _assert_nothing_written(out)


# ---- a quantized model that computes NaN/Inf: the first module is named, nothing is written ----------------------

def _break_after_quantization(monkeypatch, module_name: str, value: float = float("inf")) -> None:
    """Make ``quantize_model`` leave one fake-quant weight non-finite (as a dequantization bug would)."""
    import lowbit.workflow as workflow

    def broken(model, recipe, progress=True):
        qm = quantize_model(model, recipe, progress)
        with torch.no_grad():
            qm.model.get_submodule(module_name).weight.fill_(value)
        return qm

    monkeypatch.setattr(workflow, "quantize_model", broken)


def test_nonfinite_forward_names_first_module(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    _break_after_quantization(monkeypatch, "model.layers.1.self_attn.v_proj")
    out = tmp_path / "out"
    code, err = _run(capsys, "quantize", tiny_llama_dir, "--out", out, *EVAL)
    line = _assert_one_line_failure(code, err, "first in the output of model.layers.1.self_attn.v_proj (Linear)")
    assert "nothing was written" in line
    _assert_nothing_written(out)


def test_nonfinite_forward_of_an_encoder(tmp_path, capsys, monkeypatch):
    src = save_tiny("bert", tmp_path / "bert")
    _break_after_quantization(monkeypatch, "encoder.layer.1.output.dense", float("nan"))
    out = tmp_path / "out"
    code, err = _run(capsys, "quantize", src, "--scheme", "W8A16", "--out", out, "--sentences", "4")
    _assert_one_line_failure(code, err, "first in the output of encoder.layer.1.output.dense (Linear)")
    _assert_nothing_written(out)


def test_nonfinite_qtensor_scale_refused(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    import lowbit.workflow as workflow

    def broken(model, recipe, progress=True):
        qm = quantize_model(model, recipe, progress)
        qm.qtensors["model.layers.0.mlp.gate_proj.weight"].scales[0, 0] = float("inf")
        return qm

    monkeypatch.setattr(workflow, "quantize_model", broken)
    out = tmp_path / "out"
    code, err = _run(capsys, "quantize", tiny_llama_dir, "--out", out, "--no-eval")
    _assert_one_line_failure(code, err, "quantizing model.layers.0.mlp.gate_proj.weight gave 1 NaN/Inf scales")
    _assert_nothing_written(out)


def test_float_tensor_beyond_fp16_refused(tmp_path, tiny_llama_dir, capsys):
    """A finite fp32 norm weight beyond fp16's range becomes inf when kept in fp16: refused, not written."""
    def huge(t):
        t[0] = 1e6
        return t

    src = _with_tensor(tiny_llama_dir, tmp_path / "huge", "model.layers.0.post_attention_layernorm.weight", huge)
    out = tmp_path / "out"
    code, err = _run(capsys, "quantize", src, "--dtype", "fp16", "--out", out, "--no-eval")
    _assert_one_line_failure(code, err, "model.layers.0.post_attention_layernorm.weight has 1 NaN/Inf values in fp16")
    _assert_nothing_written(out)


def test_finite_model_passes_and_first_module_order():
    model = make_tiny_llama()
    inputs = {"input_ids": torch.arange(16)[None]}
    finite.check_forward(model, inputs)  # a healthy model: no error
    with torch.no_grad():  # two broken modules: the earlier one in forward order is named
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
        model.model.layers[0].mlp.up_proj.weight.fill_(float("inf"))
    name, count, _ = finite.first_nonfinite_module(model, lambda: model(**inputs))
    assert name == "model.layers.0.mlp.up_proj" and count > 0
    assert not any(m._forward_hooks for m in model.modules()), "hooks must be removed"


def test_check_qtensors_and_metrics():
    spec = parse_spec("int4:g32:asym")
    good = QTensor(torch.zeros(2, 32, dtype=torch.int16), torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int16),
                   spec, (2, 32))
    finite.check_qtensors({"w": good})
    bad = QTensor(good.codes, good.scales, good.zeros, spec, good.shape, global_scale=torch.tensor([float("nan")]))
    with pytest.raises(LowbitError, match="quantizing w gave 1 NaN/Inf global_scale"):
        finite.check_qtensors({"w": bad})
    assert finite.check_metrics({"ppl": 3.0, "top1": 0.5}) == {"ppl": 3.0, "top1": 0.5}
    with pytest.raises(LowbitError, match=r"kld=nan"):
        finite.check_metrics({"ppl": 3.0, "kld": math.nan})


# ---- evaluations that produce NaN/Inf are errors, never results -----------------------------------------------

def test_compare_lm_with_nan_model_raises():
    model = make_tiny_llama()
    windows = torch.randint(0, 512, (2, 24))
    ref = lm_reference(model, windows, progress=False)
    assert math.isfinite(compare_lm(model, ref, progress=False)["kld"])
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(LowbitError, match=r"evaluating the quantized model gave NaN/Inf \(ppl=nan, kld=nan"):
        compare_lm(model, ref, progress=False)
    with pytest.raises(LowbitError, match="evaluating the original model gave NaN/Inf"):
        lm_reference(model, windows, progress=False)


def test_compare_embeddings_nan_raises():
    ref = torch.randn(4, 8)
    assert compare_embeddings(ref, ref)["cosine"] == pytest.approx(1.0)
    emb = ref.clone()
    emb[1, 0] = float("nan")
    with pytest.raises(LowbitError, match="cosine=nan"):
        compare_embeddings(ref, emb)


def test_eval_of_a_nan_checkpoint_fails(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "w8"
    code, err = _run(capsys, "quantize", tiny_llama_dir, "--scheme", "W8A16", "--out", out, "--no-eval")
    assert code == 0, err
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(out / "model.safetensors"))
    key = next(k for k in tensors if "layers.0.input_layernorm" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
    code, err = _run(capsys, "eval", out, "--json", *EVAL)
    line = _assert_one_line_failure(code, err, "first in the output of model.layers.0.input_layernorm")
    assert "nothing was written" not in line


# ---- bf16 calibration overflow: recomputed in fp32 ----------------------------------------------------------

# bf16 has fp32's exponent range, so it overflows only where a result lands between bf16's largest finite value
# (3.3895e38; everything above 3.3962e38 rounds to inf) and fp32's (3.4028e38). Two activations exact in bf16
# whose squares sum to 3.4000e38 do that in the Hessian product X^T X.
X1, X2 = 2.0**63 * (1 + 1 / 128), 2.0**63 * (1 + 93 / 128)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8, bias=False)

    def forward(self, hidden, **kwargs):
        return (self.proj(hidden) * 1e-20,)


class _HugeActivations(nn.Module):
    """Embeddings -> two blocks; tokens 0 and 1 embed to X1 and X2 in every channel, token 2 to zeros."""

    def __init__(self, x1: float = X1, x2: float = X2):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(3, 8)
        self.layers = nn.ModuleList([_Block(), _Block()])
        with torch.no_grad():
            self.embed.weight.zero_()
            self.embed.weight[0], self.embed.weight[1] = x1, x2
            for block in self.layers:
                block.proj.weight.copy_(torch.randn(8, 8))

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        for block in self.layers:
            h = block(h)[0]
        return h


def _huge_ids() -> torch.Tensor:
    ids = torch.full((1, 1024), 2)  # many zero rows keep H = 2/n X^T X moderate enough for GPTQ
    ids[0, 0], ids[0, 1] = 0, 1
    return ids


def _gptq_recipe() -> Recipe:
    return Recipe("test", method="gptq", float_dtype="fp32", rules=(Rule(("Linear",), parse_spec("int8:channel")),),
                  ignore=())


def test_bf16_really_overflows_where_fp32_does_not():
    rows = torch.tensor([[X1] * 8, [X2] * 8])
    assert X1 == float(torch.tensor(X1).bfloat16()) and X2 == float(torch.tensor(X2).bfloat16())
    for dtype, expect_finite in ((torch.float32, True), (torch.bfloat16, False)):
        stats = InputStats(8, product_dtype=dtype)
        stats.update(rows)
        assert stats.finite() is expect_finite
    assert float(rows[:, 0].square().sum()) == pytest.approx(3.40e38, rel=1e-3)


def test_bf16_overflowing_block_is_recomputed_in_fp32(caplog):
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        qm = quantize_calibrated(_HugeActivations(), _gptq_recipe(), _huge_ids(), 1, progress=False,
                                 compute_dtype=torch.bfloat16)
    assert qm.fp32_blocks == [0]  # block 1 sees tiny inputs: its bf16 pass stands
    assert "block 0: bf16 calibration input statistics of proj overflowed; recomputing this block in fp32" \
        in caplog.text
    reference = quantize_calibrated(_HugeActivations(), _gptq_recipe(), _huge_ids(), 1, progress=False)
    assert reference.fp32_blocks == []
    first = "layers.0.proj.weight"  # block 0 was redone entirely in fp32: the same codes and scales as fp32
    assert torch.equal(qm.qtensors[first].codes, reference.qtensors[first].codes)
    assert torch.equal(qm.qtensors[first].scales, reference.qtensors[first].scales)
    for qt in qm.qtensors.values():
        assert bool(torch.isfinite(qt.scales).all())


def test_statistics_beyond_fp32_are_an_error():
    with pytest.raises(LowbitError, match="block 0: the input statistics of proj are NaN/Inf even in fp32"):
        quantize_calibrated(_HugeActivations(1e20, 1e20), _gptq_recipe(), _huge_ids(), 1, progress=False,
                            compute_dtype=torch.bfloat16)


def test_nonfinite_quantized_block_output_names_module(monkeypatch):
    """A quantized block whose propagation pass goes NaN (here: a broken dequantization) names its module."""
    import lowbit.pipeline.calibrated as calibrated

    real = calibrated.dequantize

    def broken(qt):
        w = real(qt)
        return torch.full_like(w, float("nan")) if qt.shape == (8, 8) else w

    monkeypatch.setattr(calibrated, "dequantize", broken)
    with pytest.raises(LowbitError, match=r"first in the output of layers\.0\.proj"):
        quantize_calibrated(_HugeActivations(1.0, 2.0), _gptq_recipe(), _huge_ids(), 1, progress=False)


def test_report_records_fp32_blocks(tmp_path, tiny_llama_dir, capsys):
    import json

    out = tmp_path / "gptq"
    code = main(["quantize", str(tiny_llama_dir), "--method", "gptq", "--out", str(out), "--json", *EVAL, *CALIB])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration"]["fp32_blocks"] == []
    assert all(math.isfinite(v) for v in report["eval"].values() if isinstance(v, float))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_count_is_exact_whatever_the_sum_does(dtype):
    """The one-reduction shortcut never hides a NaN/Inf, and a finite sum that overflows still counts exactly."""
    big = torch.finfo(dtype).max
    huge = torch.full((64,), big, dtype=dtype)  # finite values whose sum overflows
    assert finite.nonfinite_count(huge) == 0
    cancelling = huge.clone()
    cancelling[3], cancelling[9] = float("inf"), -float("inf")  # inf + -inf: the sum is NaN, the count 2
    assert finite.nonfinite_count(cancelling) == 2
    plain = torch.randn(1000).to(dtype)
    assert finite.nonfinite_count(plain) == 0
    plain[[1, 500]] = float("nan")
    assert finite.nonfinite_count([plain, {"x": plain}]) == 4
