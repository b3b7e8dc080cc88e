"""``lowbit bench llm`` on tiny random Llama and Qwen2 models: a GGUF file beside the F16 GGUF lowbit writes
(llama.cpp) and an int4 MatMulNBits KV-cache graph beside the fp32 graph (onnxruntime), every figure finite
and positive with its ratio to the original; bad input is a one-line error and a non-zero exit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lowbit.cli import main
from tests.arch_models import save_tiny
from tests.export.helpers import quantize_folder

FAST = ["--prompt-tokens", "24", "--new-tokens", "6", "--runs", "1", "--threads", "1"]
FIGURES = ("bytes", "prompt_tps", "decode_tps", "ttft_s", "peak_rss_bytes")


@pytest.fixture(scope="module", params=("llama", "qwen2"))
def files(request, tmp_path_factory) -> dict[str, Path]:
    """The tiny model's folder, its Q8_0 GGUF and its W4A16 (int4 MatMulNBits) KV-cache graph folder."""
    from lowbit.export.gguf import GGUFExportOptions, export_gguf
    from lowbit.export.onnx_checkpoint import export_onnx_folder

    root = tmp_path_factory.mktemp(request.param)
    folder = save_tiny(request.param, root / "hf", seed=4)
    gguf = root / "tiny-Q8_0.gguf"
    export_gguf(GGUFExportOptions(model=str(folder), type="Q8_0", out=str(gguf), method="rtn"), progress=False)
    ckpt = quantize_folder(folder, root / "w4", ["--scheme", "W4A16", "--group-size", "32"])
    export_onnx_folder(ckpt, root / "w4-onnx")
    return {"hf": folder, "gguf": gguf, "onnx": root / "w4-onnx"}


def test_gguf_and_onnx_pairs_are_timed_beside_their_originals(files, capsys, tmp_path):
    capsys.readouterr()
    assert main(["bench", "llm", str(files["gguf"]), str(files["onnx"]), "--original", str(files["hf"]), *FAST,
                 "--keep-originals", str(tmp_path / "originals"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert [(r["label"], r["engine"], r["original"]) for r in rows] == [
        ("original (F16 GGUF)", "llama.cpp", True), ("tiny-Q8_0.gguf", "llama.cpp", False),
        ("original (fp32 ONNX)", "onnxruntime", True), ("w4-onnx", "onnxruntime", False)]
    for row in rows:
        for key in FIGURES:
            assert math.isfinite(row[key]) and row[key] > 0, (row["label"], key)
            assert math.isfinite(row["ratios"][key]) and row["ratios"][key] > 0
        if row["original"]:
            assert all(ratio == 1.0 for ratio in row["ratios"].values())
    assert rows[1]["ratios"]["bytes"] < 0.7 and rows[3]["ratios"]["bytes"] < 0.7  # Q8_0 vs F16, int4 vs fp32
    assert sorted(p.name for p in (tmp_path / "originals").iterdir()) == ["original-F16.gguf", "original-fp32"]
    assert result["options"] == {"prompt_tokens": 24, "new_tokens": 6, "runs": 1, "threads": 1}


def test_the_table_has_the_expected_columns(files, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")  # rich wraps headers to the terminal width
    capsys.readouterr()
    assert main(["bench", "llm", str(files["onnx"]), "--original", str(files["hf"]), *FAST]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "engine" in line)
    for column in ("model", "engine", "size MB", "prompt tok/s", "decode tok/s", "TTFT ms", "peak RSS MB"):
        assert column in header
    assert "original (fp32 ONNX)" in out and "w4-onnx" in out and "(1.00x)" in out


def _refused(argv: list[str], capsys, expected: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lowbit: error: ") and expected in err


def test_bad_input_is_a_one_line_error(files, capsys, tmp_path):
    from lowbit.export.onnx import OnnxExportOptions, export_onnx

    (tmp_path / "notes.txt").write_text("hello")
    window = tmp_path / "window.onnx"
    export_onnx(OnnxExportOptions(model=str(files["hf"]), mode="float", out=str(window), kv_cache=False))
    original = ["--original", str(files["hf"])]
    _refused(["bench", "llm", str(tmp_path / "missing.gguf"), *original], capsys, "missing.gguf does not exist")
    _refused(["bench", "llm", str(tmp_path / "notes.txt"), *original], capsys, "notes.txt is neither a .gguf nor")
    _refused(["bench", "llm", str(window), *original], capsys, "window.onnx has no KV cache")
    _refused(["bench", "llm", str(files["gguf"]), *original, "--prompt-tokens", "300"], capsys,
             "need a context of 365 tokens; the model's is 256")
    _refused(["bench", "llm", str(files["gguf"]), *original, "--runs", "0"], capsys, "must all be at least 1")


def test_a_lowbit_folder_runs_in_transformers_beside_a_gguf_original(files, capsys, tmp_path):
    from lowbit.export.gguf import GGUFExportOptions, export_gguf

    source = tmp_path / "f32.gguf"  # an original given as a GGUF file (as the built-in SmolLM2 is)
    export_gguf(GGUFExportOptions(model=str(files["hf"]), type="F32", out=str(source), method="rtn"), progress=False)
    ckpt = quantize_folder(files["hf"], tmp_path / "w8", ["--scheme", "W8A16"])
    capsys.readouterr()
    assert main(["bench", "llm", str(ckpt), "--original", str(source), *FAST, "--keep-originals",
                 str(tmp_path / "originals"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["label"], r["engine"]) for r in rows] == [("original (float)", "transformers"), ("w8", "transformers")]
    assert (tmp_path / "originals" / "original-float" / "config.json").is_file()
    assert all(math.isfinite(r[key]) and r[key] > 0 for r in rows for key in FIGURES)
