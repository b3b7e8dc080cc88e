"""bench/fuzz_readers.py at a tiny scale: it writes its results file with the command that made it and a row per
stage, and the header stages end every case in "loaded" or a one-line LowbitError."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "fuzz_readers.py"


def test_fuzz_script_writes_its_results(tmp_path):
    out = tmp_path / "RESULTS_fuzz.md"
    command = [sys.executable, str(SCRIPT), "--gguf-cases", "60", "--safetensors-cases", "40", "--seed", "3",
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    args = f"--gguf-cases 60 --safetensors-cases 40 --seed 3 --out {out}"
    assert f"Command: `python bench/fuzz_readers.py {args}`" in text
    rows = {line.split(" | ")[0].removeprefix("| "): line.split(" | ")[1:] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| stage")}
    assert set(rows) == {"GGUF header", "GGUF load_model", "safetensors"}
    for stage, cases in (("GGUF header", "60"), ("safetensors", "40")):
        total, loaded, refused, other, timeout, _ = rows[stage]
        assert total == cases and int(loaded) + int(refused) == int(cases) and other == timeout == "0"
