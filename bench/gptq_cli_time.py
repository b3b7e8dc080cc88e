"""How long the CLI default ``lowbit quantize --method gptq --no-eval`` quantizes (128 x 512 calibration tokens).

    .venv/bin/python bench/gptq_cli_time.py [--label TEXT] [extra lowbit quantize flags...]

Runs the CLI in this process (built-in SmolLM2-135M, the CLI's defaults otherwise), also timing the resume state's
per-block saves, and adds a row to the section of bench/RESULTS.md (rows of earlier runs are kept: compare rows
of the same machine and day only; run it alone on the machine).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_file import write_section  # noqa: E402

from lowbit.cli import main as lowbit_main  # noqa: E402
from lowbit.pipeline import resume  # noqa: E402

TITLE = "## GPTQ: the CLI default's quantization time"
ROWS = Path(__file__).with_name("gptq_cli_rows.json")


def machine() -> str:
    """The CPU's name, whether it has native bf16 (it decides the passes' dtype), and its cores."""
    import os

    from lowbit.hardware import cpu_has_bf16

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "CPU")
    return f"{name}, {'avx512_bf16' if cpu_has_bf16() else 'no native bf16'}, {os.cpu_count()} cores"


def main() -> None:
    args = sys.argv[1:]
    label = "current code"
    if args[:1] == ["--label"]:
        label, args = args[1], args[2:]
    spent: list[float] = []
    save_block = resume.BlockState.save_block

    def timed(self, *a, **k):
        start = time.perf_counter()
        save_block(self, *a, **k)
        spent.append(time.perf_counter() - start)

    resume.BlockState.save_block = timed
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gptq"
        lowbit_main(["quantize", "--method", "gptq", "--no-eval", "--force", "--out", str(out), *args])
        seconds = json.loads((out / "report.json").read_text())["seconds"]
    row = {"label": label, "date": str(date.today()), "quantize_s": seconds["quantize"], "save_s": sum(spent),
           "flags": " ".join(args), "machine": machine()}
    rows = (json.loads(ROWS.read_text()) if ROWS.is_file() else []) + [row]
    ROWS.write_text(json.dumps(rows, indent=1))
    lines = [TITLE, "", "Command: `python bench/gptq_cli_time.py [--label TEXT]` (lowbit quantize --method gptq --no-eval: "
             "W4A16 g128, act-order, MSE scales, 128 x 512 calibration tokens, bf16 passes where the CPU has them), "
             "each run alone on the 2-core machine (other processes stopped). Seconds: report.json seconds.quantize; "
             "saves: the resume state's per-block writes inside it.", "",
             "| date | code | flags | quantize s | state saves s | machine |", "| --- | --- | --- | ---: | ---: | --- |"]
    lines += [f"| {r['date']} | {r['label']} | {r['flags'] or '-'} | {r['quantize_s']:.1f} | {r['save_s']:.1f} | "
              f"{r['machine']} |" for r in rows]
    write_section(Path(__file__).with_name("RESULTS.md"), TITLE, "\n".join(lines) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
