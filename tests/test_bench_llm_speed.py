"""bench/llm_speed.py at a tiny scale (a tiny random Llama, one GGUF type, short prompt): it writes its section of
the results file with the command that made it, the GGUF and ONNX rows and the ONNX decode verdict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.arch_models import save_tiny

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "llm_speed.py"


def test_llm_speed_script_writes_its_results_section(tmp_path):
    folder = save_tiny("llama", tmp_path / "tiny", seed=6)
    out = tmp_path / "RESULTS_speed.md"
    out.write_text("# Benchmark results\n\n## Another section\n\nkept\n")
    command = [sys.executable, str(SCRIPT), "--model", str(folder), "--types", "Q8_0,Q4_0", "--prompt-tokens", "24",
               "--new-tokens", "4", "--runs", "1", "--threads", "1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "## Another section\n\nkept" in text
    assert "## Speed and memory in llama.cpp and onnxruntime: tiny" in text
    assert f"Command: `python {SCRIPT} --model {folder} --types Q8_0,Q4_0" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(("| file", "| ---"))]
    labels = [line.split(" | ")[0].removeprefix("| ") for line in rows]
    assert labels == ["original (F16 GGUF)", "tiny-Q8_0.gguf", "tiny-Q4_0.gguf", "original (fp32 ONNX)", "w4-onnx",
                      "w4-a0-onnx"]
    assert "- w4-onnx: decode " in text and "x the fp32 graph's (target >= 1.5x: " in text
