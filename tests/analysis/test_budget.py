"""quantize --target-bpw / --target-size on tiny models: the budget holds, the report puts predicted beside
measured KLD, recipe.yaml reproduces the output byte for byte, unreachable budgets are one-line errors."""

from __future__ import annotations

import json

import pytest
import yaml

from lowbit.cli import main
from tests.arch_models import save_tiny

CANDIDATES = "int2:g32:asym,int3:g32:asym,int4:g32:asym,int8:channel"
SMALL = ["--calib-samples", "4", "--calib-length", "64", "--windows", "2", "--window-length", "64",
         "--calib-dtype", "fp32"]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def folder(request, tmp_path_factory):
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param) / "model")


def _quantize(folder, out, *extra) -> int:
    return main(["quantize", str(folder), "--out", str(out), "--force", "--json", *SMALL, *extra])


def test_target_bpw_meets_the_budget_and_the_recipe_reproduces_it(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "mix"
    assert _quantize(folder, out, "--target-bpw", "3.5", "--candidates", CANDIDATES) == 0
    report = json.loads((out / "report.json").read_text())
    allocation = report["allocation"]
    assert allocation["bits_per_weight"] <= 3.5 and allocation["bits_per_weight"] > 3.0
    assert allocation["measured_kld"] == report["eval"]["kld"] and allocation["predicted_kld"] > 0
    assert len(set(allocation["modules_by_candidate"])) >= 2  # a mix, not one spec
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["options"]["allocation"]["target"] == "3.5 bpw"
    again = tmp_path / "again"
    assert _quantize(folder, again, "--recipe", str(out / "recipe.yaml")) == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_target_size_and_unreachable_budgets(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    reference = tmp_path / "bpw4"
    assert _quantize(folder, reference, "--target-bpw", "4", "--candidates", CANDIDATES, "--no-eval") == 0
    target = (reference / "model.safetensors").stat().st_size  # a size the candidates can reach
    out = tmp_path / "sized"
    assert _quantize(folder, out, "--target-size", str(target), "--candidates", CANDIDATES, "--no-eval") == 0
    size = (out / "model.safetensors").stat().st_size
    assert 0.97 * target <= size <= 1.01 * target
    capsys.readouterr()
    for flag, value in (("--target-bpw", "1.0"), ("--target-bpw", "12"), ("--target-size", "1KB")):
        assert _quantize(folder, tmp_path / "bad", flag, value, "--candidates", CANDIDATES, "--no-eval") == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
        assert err.startswith("lowbit: error: ") and ("out of reach" in err or "smaller than" in err)
        assert not (tmp_path / "bad").exists()


def test_a_candidate_the_format_cannot_hold_is_refused_first(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    code = _quantize(folder, tmp_path / "x", "--format", "gptq", "--target-bpw", "4",
                     "--candidates", "int4:g32:asym,int5:g32:asym")
    assert code == 2
    err = capsys.readouterr().err
    assert "int5:g32:asym cannot be written as gptq" in err
    assert not (tmp_path / "cache").exists()  # refused before any analysis


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_a_mixed_plan_loads_in_transformers_as_compressed_tensors(tmp_path, monkeypatch):
    """Several specs in one model become several compressed-tensors config groups; transformers reads them all."""
    import torch
    from transformers import AutoModelForCausalLM

    from lowbit.model.checkpoint import load_checkpoint

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    folder = save_tiny("llama", tmp_path / "llama")
    out = tmp_path / "mix"
    assert _quantize(folder, out, "--target-bpw", "5.2", "--candidates", "int3:g32,int4:g32,int8:channel",
                     "--format", "lowbit,hf", "--embeddings", "keep", "--lm-head", "keep", "--no-eval") == 0
    config = json.loads((tmp_path / "mix-hf" / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) >= 2
    ours, _, _ = load_checkpoint(out)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "mix-hf"), dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)
