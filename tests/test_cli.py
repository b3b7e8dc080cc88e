"""The CLI end to end on a tiny Llama folder, and every bad input: one-line error, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lowbit.cli import main

EVAL = ["--windows", "2", "--window-length", "64"]


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _assert_clean_failure(capsys, out_dir: Path, *args, match: str) -> None:
    code, _, err = _run(capsys, *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("lowbit: error:")]
    assert len(lines) == 1 and match in lines[0], err
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(f".{out_dir.name}.tmp-*")), "temporary output left behind"


def test_quantize_writes_report_and_reloads(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "w4"
    code, stdout, _ = _run(capsys, "quantize", tiny_llama_dir, "--scheme", "W4A16", "--group-size", "32", "--asym",
                           "--embeddings", "keep", "--out", out, "--json", *EVAL)
    assert code == 0
    report = json.loads(stdout)
    assert report == json.loads((out / "report.json").read_text())
    for key in ("model", "scheme", "method", "spec", "size_bytes", "bits_per_weight", "eval", "seconds", "lowbit_version"):
        assert key in report
    assert report["spec"] == "int4:g32:asym" and report["method"] == "rtn"
    assert set(report["eval"]) >= {"text", "windows", "tokens", "ppl_base", "ppl", "kld", "top1"}
    assert report["eval"]["tokens"] == 128 and report["eval"]["kld"] > 0
    # codes at 4 bits + fp16 scale and 4-bit zero per 32 weights = 4 + 16/32 + 4/32
    assert report["bits_per_weight"] == pytest.approx(4.625, abs=0.01)
    assert report["size_bytes"] == (out / "model.safetensors").stat().st_size
    for name in ("config.json", "recipe.yaml", "lowbit.json", "tokenizer.json"):
        assert (out / name).is_file()

    code, stdout, _ = _run(capsys, "eval", out, "--json", *EVAL)
    assert code == 0
    again = json.loads(stdout)
    assert again["eval"]["kld"] == pytest.approx(report["eval"]["kld"], rel=1e-5)
    assert again["eval"]["ppl"] == pytest.approx(report["eval"]["ppl"], rel=1e-5)


def test_w16a16_is_a_pure_cast(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "fp16"
    code, stdout, _ = _run(capsys, "quantize", tiny_llama_dir, "--scheme", "W16A16", "--out", out, "--json", *EVAL)
    assert code == 0
    report = json.loads(stdout)
    assert report["bits_per_weight"] == 16 and report["quantized_tensors"] == 0
    assert report["eval"]["kld"] < 1e-4


def test_table_output_and_recipe_file(tmp_path, tiny_llama_dir, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("scheme: mixed\nignore: [lm_head]\nrules:\n  - {targets: ['*.down_proj'], spec: int8:channel}\n"
                      "  - {targets: [Linear], spec: 'int3:g32:asym'}\n")
    out = tmp_path / "mixed"
    code, stdout, _ = _run(capsys, "quantize", tiny_llama_dir, "--recipe", recipe, "--out", out, *EVAL)
    assert code == 0
    assert "original" in stdout and "quantized" in stdout and "KLD" in stdout
    code, stdout, _ = _run(capsys, "inspect", out, "--json")
    types = {t["name"]: t["type"] for t in json.loads(stdout)["tensors"]}
    assert types["model.layers.0.mlp.down_proj.weight"] == "int8:channel"
    assert types["model.layers.0.mlp.up_proj.weight"] == "int3:g32:asym"
    assert types["model.norm.weight"] == "F16"


def test_existing_output_needs_force(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, "quantize", tiny_llama_dir, "--out", out, "--no-eval")
    assert code == 2 and "--force" in err and (out / "keep.txt").exists()
    code, _, _ = _run(capsys, "quantize", tiny_llama_dir, "--out", out, "--no-eval", "--force")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_inspect_safetensors_folder(tiny_llama_dir, capsys):
    code, stdout, _ = _run(capsys, "inspect", tiny_llama_dir, "--json")
    summary = json.loads(stdout)
    assert code == 0 and summary["kind"] == "safetensors"
    assert summary["bits_per_weight"] == 32.0


# ---- bad input ---------------------------------------------------------------------------------------


def test_missing_model(tmp_path, capsys):
    _assert_clean_failure(capsys, tmp_path / "o", "quantize", tmp_path / "nope", "--out", tmp_path / "o",
                          match="not found")


def test_truncated_safetensors(tmp_path, tiny_llama_dir, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    _assert_clean_failure(capsys, tmp_path / "o", "quantize", bad, "--out", tmp_path / "o", match="truncated safetensors")


def test_corrupt_safetensors_header(tmp_path, tiny_llama_dir, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    _assert_clean_failure(capsys, tmp_path / "o", "quantize", bad, "--out", tmp_path / "o", match="corrupt safetensors")


def test_not_a_gguf(tmp_path, capsys):
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    _assert_clean_failure(capsys, tmp_path / "o", "quantize", bad, "--out", tmp_path / "o", match="not a GGUF file")


def test_corrupt_gguf(tmp_path, capsys):
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    _assert_clean_failure(capsys, tmp_path / "o", "quantize", bad, "--out", tmp_path / "o", match="corrupt or truncated GGUF")


def test_truncated_gguf(tmp_path, capsys):
    from lowbit.model.load import resolve_source

    src = resolve_source("smollm2")
    bad = tmp_path / "m.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    _assert_clean_failure(capsys, tmp_path / "o", "quantize", bad, "--out", tmp_path / "o", match="truncated GGUF")
    _assert_clean_failure(capsys, tmp_path / "o", "inspect", bad, match="truncated GGUF")


@pytest.mark.parametrize(
    "args, match",
    [
        (["--rule", "Linear=int9:g128"], "unknown number format 'int9'"),
        (["--group-size", "0"], "--group-size must be a positive integer"),
        (["--group-size", "-4"], "--group-size must be a positive integer"),
        (["--scheme", "W5A5"], "unknown scheme 'W5A5'"),
        (["--method", "magic"], "unknown method 'magic'"),
        (["--rule", "no-equals-sign"], "must look like PATTERN=SPEC"),
    ],
)
def test_bad_options(tmp_path, tiny_llama_dir, capsys, args, match):
    _assert_clean_failure(capsys, tmp_path / "o", "quantize", tiny_llama_dir, "--out", tmp_path / "o", *args, match=match)


def test_nan_weights(tmp_path, capsys):
    from tests.conftest import make_tiny_llama, make_tokenizer

    from lowbit.data.text import default_text

    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = float("inf")
    folder = tmp_path / "nan"
    model.save_pretrained(str(folder), safe_serialization=True)
    make_tokenizer(default_text()).save_pretrained(str(folder))
    _assert_clean_failure(capsys, tmp_path / "o", "quantize", folder, "--out", tmp_path / "o", *EVAL,
                          match="v_proj.weight has 1 NaN/Inf")


def test_empty_text_file(tmp_path, tiny_llama_dir, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    _assert_clean_failure(capsys, tmp_path / "o", "quantize", tiny_llama_dir, "--out", tmp_path / "o",
                          "--text", empty, match="is empty")


def test_text_too_short_for_a_window(tmp_path, tiny_llama_dir, capsys):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    _assert_clean_failure(capsys, tmp_path / "o", "quantize", tiny_llama_dir, "--out", tmp_path / "o",
                          "--text", short, match="an evaluation window needs 512")


def test_eval_of_a_folder_that_is_not_ours(tmp_path, tiny_llama_dir, capsys):
    code, _, err = _run(capsys, "eval", tiny_llama_dir)
    assert code == 2 and "not a lowbit output folder" in err


def test_calibrated_method_records_its_samples(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "gptq"
    code, stdout, _ = _run(capsys, "quantize", tiny_llama_dir, "--scheme", "W4A16", "--group-size", "32",
                           "--method", "awq+gptq", "--act-order", "--calib-samples", "6", "--calib-length", "64",
                           "--calib-batch", "4", "--out", out, "--json", *EVAL)
    assert code == 0
    report = json.loads(stdout)
    cal = report["calibration"]
    assert cal["samples"] == 6 and cal["length"] == 64 and len(cal["sample_starts"]) == 6
    assert cal["dtype"] in ("bf16", "fp32")
    assert min(cal["sample_starts"]) >= report["eval"]["tokens"]  # never the evaluation tokens
    assert report["method"] == "awq+gptq" and report["peak_rss_mb"] > 0
    recipe = (out / "recipe.yaml").read_text()
    assert "act_order: true" in recipe and "method: awq+gptq" in recipe


def test_gptq_two_pass_order_is_a_flag_and_is_recorded(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "gptq"
    code, _, _ = _run(capsys, "quantize", tiny_llama_dir, "--scheme", "W4A16", "--group-size", "32", "--method",
                      "gptq", "--no-true-sequential", "--calib-samples", "4", "--calib-length", "32",
                      "--calib-batch", "2", "--out", out, "--no-eval")
    assert code == 0
    assert "true_sequential: false" in (out / "recipe.yaml").read_text()


@pytest.mark.parametrize("args, match", [(["--calib-samples", "0"], "must be positive"),
                                         (["--calib-samples", "100000"], "gives only")])
def test_bad_calibration_options(tmp_path, tiny_llama_dir, capsys, args, match):
    _assert_clean_failure(capsys, tmp_path / "o", "quantize", tiny_llama_dir, "--method", "gptq", "--out",
                          tmp_path / "o", *args, match=match)


def test_stream_then_eval(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "streamed"
    code, stdout, _ = _run(capsys, "quantize", tiny_llama_dir, "--method", "gptq", "--group-size", "32", "--stream",
                           "--calib-samples", "4", "--calib-length", "64", "--out", out, "--json")
    assert code == 0
    report = json.loads(stdout)
    # 14 linears and the token embedding (25% of the tiny Llama's weights: int8 per row by default)
    assert report["streamed"] is True and report["eval"] is None and report["quantized_tensors"] == 15
    assert report["seconds"]["load"] > 0 and report["peak_rss_mb"] > 0
    assert report["embeddings"] == "int8:channel (default: 25% of weights)"
    code, stdout, _ = _run(capsys, "eval", out, "--json", *EVAL)
    assert code == 0 and json.loads(stdout)["eval"]["kld"] > 0


def test_quantize_writes_every_asked_format_from_one_run(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "w4"
    code = main(["quantize", str(tiny_llama_dir), "--scheme", "W4A16", "--group-size", "32", "--format",
                 "lowbit,hf,gptq", "--out", str(out), "--no-eval"])
    assert code == 0, capsys.readouterr().err
    assert (out / "report.json").is_file()
    hf_config = json.loads((tmp_path / "w4-hf" / "config.json").read_text())
    assert hf_config["quantization_config"]["quant_method"] == "compressed-tensors"
    gptq_config = json.loads((tmp_path / "w4-gptq" / "quantize_config.json").read_text())
    assert gptq_config["bits"] == 4 and gptq_config["group_size"] == 32
