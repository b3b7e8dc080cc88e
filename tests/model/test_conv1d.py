"""GPT-2's transposed Conv1D projections: quantized through the CLI like any linear, and the written
checkpoint reloads to the very model that was evaluated."""

from __future__ import annotations

import json

import pytest

from lowbit.cli import main
from lowbit.model.checkpoint import WEIGHTS_FILE, load_checkpoint, read_qtensors
from lowbit.workflow import EvalOptions, eval_job
from tests.arch_models import save_tiny

EVAL = ["--windows", "2", "--window-length", "64"]


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_gpt2_quantizes_evaluates_and_reloads(tmp_path, capsys, method):
    source = save_tiny("gpt2", tmp_path / "gpt2")
    out = tmp_path / "q"
    code = main(["quantize", str(source), "--group-size", "32", "--method", method, "--calib-samples", "4",
                 "--calib-length", "64", "--out", str(out), "--json", *EVAL])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "causal-lm"
    qtensors, _ = read_qtensors(out / WEIGHTS_FILE)
    projections = {n for n in qtensors if n.startswith("transformer.h.")}
    assert len(projections) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks
    model, _, _ = load_checkpoint(out)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (192, 64)  # linear layout [out, in]
    again = eval_job(out, EvalOptions(windows=2, length=64), progress=False)
    for key in ("ppl", "kld", "top1"):
        assert again["eval"][key] == pytest.approx(report["eval"][key], rel=1e-5, abs=1e-7)
