"""lowbit analyze on tiny models of several families: the measured KLD is the real end-to-end KLD, the proxies
and Spearman are reported, and a second run is read from the cache."""

from __future__ import annotations

import pytest
import torch

from lowbit.analysis.candidates import parse_candidate
from lowbit.analysis.sensitivity import AnalyzeOptions, analyze
from lowbit.model.load import load_model
from tests.arch_models import save_tiny

CANDIDATES = ("int2:g32:asym", "int3:g32:asym", "int4:g32:asym", "int8:channel", "keep")


def _options(path, **kw) -> AnalyzeOptions:
    return AnalyzeOptions(model=str(path), candidates=CANDIDATES, calib_samples=4, calib_length=64, kld_samples=2,
                          kld_length=48, eval_tokens=0, compute_dtype="fp32", **kw)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def tiny_folder(request, tmp_path_factory):
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param) / "model")


def test_analyze_measures_every_linear_and_caches(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    opts = _options(tiny_folder)
    loaded = load_model(str(tiny_folder))
    sens = analyze(opts, loaded=loaded, progress=False)
    assert not sens.cached and sens.probe == "int3:g32:asym"
    linears = [m for m in sens.modules if m.kind == "linear"]
    assert len(linears) >= 2 * 4
    for m in linears:
        assert m.kld[m.probe] >= 0 and set(m.fisher) == set(m.bits)
        # fewer bits, more error: each proxy falls from int2 to int8
        assert m.hessian["int2:g32:asym"] > m.hessian["int4:g32:asym"] > m.hessian["int8:channel"]
        assert m.predicted["keep"] == 0.0
    assert {m.kind for m in sens.modules} >= {"linear", "embedding"}
    assert all(-1.0 <= v <= 1.0 for k, v in sens.spearman.items() if k != "modules")
    assert len(sens.blocks) == 2 and all(b["kld"]["int2:g32:asym"] > b["kld"]["int8:channel"] for b in sens.blocks)
    # the model is left as it was
    reloaded = load_model(str(tiny_folder)).model.state_dict()
    assert all(torch.equal(v, reloaded[k]) for k, v in loaded.model.state_dict().items())
    again = analyze(opts, loaded=loaded, progress=False)
    assert again.cached and again.to_dict() == sens.to_dict()


def test_measured_kld_is_the_full_forward_kld(tmp_path, monkeypatch):
    """The probe's KLD of one linear equals quantizing that linear in the whole model and comparing outputs."""
    from lowbit.analysis.sensitivity import _windows

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    folder = save_tiny("llama", tmp_path / "llama")
    opts = _options(folder, cache=False, blocks=False)
    loaded = load_model(str(folder))
    sens = analyze(opts, loaded=loaded, progress=False)
    windows = _windows(loaded, opts)[0][: opts.kld_samples, : opts.kld_length]
    model = loaded.model
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=windows).logits[:, :-1].float(), -1)
        target = max((m for m in sens.modules if m.kind == "linear"), key=lambda m: m.kld[m.probe])
        linear = dict(model.named_modules())[target.name]
        linear.weight.copy_(parse_candidate(target.probe).dequantized(linear.weight))
        test = torch.log_softmax(model(input_ids=windows).logits[:, :-1].float(), -1)
    full = float((ref.exp() * (ref - test)).sum(-1).mean())
    assert target.kld[target.probe] == pytest.approx(full, rel=1e-4)


def test_analyze_command_writes_json_and_plot(tmp_path, monkeypatch, capsys):
    import json

    from lowbit.cli import main

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    folder = save_tiny("qwen3", tmp_path / "qwen3")
    out = tmp_path / "sens"
    args = ["analyze", str(folder), "--candidates", ",".join(CANDIDATES), "--calib-samples", "4",
            "--kld-windows", "2", "--kld-length", "48", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "most sensitive linears" in printed and "Spearman" in printed
    data = json.loads((out / "sensitivity.json").read_text())
    assert data["lowbit_sensitivity"] == 1 and data["probe"] == "int3:g32:asym"
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(args) == 0 and "read from the cache" in capsys.readouterr().out
    assert main(["analyze", str(folder), "--candidates", "int4:g32,int9:g32", "--out", str(out)]) == 2
