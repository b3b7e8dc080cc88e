"""One row per model family of the architecture table, on tiny random models built from transformers config
classes (tests/arch_models.py; nothing downloaded):

- float error (max |delta| / max |output|) of folding AWQ and SmoothQuant scales into every table pair;
- llama.cpp vs transformers on the F32 GGUF that ``lowbit export gguf`` writes (max |delta log-prob|);
- output error of RTN / GPTQ / AWQ / AWQ+GPTQ at int4 g32 asym (mean KLD of next-token distributions for
  decoders, relative MSE of hidden states for encoders) on held-out random token windows;
- load checks in the real consumers, as run by tests/export/test_families_export.py (transformers loads the
  compressed-tensors folder, onnxruntime runs the ONNX graph, both agreeing with lowbit's model; or the
  exporter's one-line refusal is what the test checks).

Usage: ``.venv/bin/python bench/arch_table.py [--out bench/RESULTS_arch.md]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import xml.etree.ElementTree as ET
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_file import write_section  # noqa: E402
from lowbit.arch import family_of  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from tests.arch_models import (CONFIGS, fold_everything, lowbit_model, outputs, quantized_errors,  # noqa: E402
                               random_ids, save_tiny)

TITLE = "## Model families (tiny random models)"


def fold_error(family: str, kind: str) -> float:
    model = lowbit_model(family)
    entry = family_of(model)
    ids = random_ids()
    before = outputs(model, ids)
    fold_everything(model, entry.scale_pairs, entry.norm_offset, kind)
    return float((outputs(model, ids) - before).abs().max() / before.abs().max())


def gguf_agreement(family: str, work: Path) -> str:
    """Max |log-prob difference| between llama.cpp on our F32 GGUF and transformers, or why there is none."""
    from lowbit.eval.llamacpp import gguf_logprobs
    from lowbit.export.gguf import GGUFExportOptions, export_gguf

    if family_of(lowbit_model(family)).encoder:
        return "n/a (encoder)"
    # Neutral names: llama.cpp switches on Phi-3 token handling when general.name contains "phi3", which the
    # tiny byte-level tokenizer (no </s>) cannot satisfy.
    folder = save_tiny(family, work / "hf")
    out = work / f"model-{len(list(work.iterdir()))}.gguf"
    try:
        export_gguf(GGUFExportOptions(model=str(folder), type="F32", out=str(out), method="rtn"), progress=False)
        windows = random_ids(2, 64)
        ours = gguf_logprobs(out, windows, f32_cache=True)
    except LowbitError as exc:
        return f"refused: {exc}"
    ref = outputs(lowbit_model(family), windows).log_softmax(-1)[:, :-1]
    return f"{max(float((a - b).abs().max()) for a, b in zip(ours, ref)):.1e}"


def load_checks(work: Path) -> dict[tuple[str, str], str]:
    """(family, "ct"|"onnx") -> "ok" / "refused" / "FAILED", from one pytest run of the export family tests."""
    report = work / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/export/test_families_export.py",
                    f"--junitxml={report}"], check=False, capture_output=True)
    out = {}
    for case in ET.parse(report).iter("testcase"):
        name = case.get("name", "")
        family = name[name.index("[") + 1:-1]
        kind = "onnx" if "onnx" in name else "ct"
        failed = case.find("failure") is not None or case.find("error") is not None
        out[(family, kind)] = "FAILED" if failed else ("refused" if "refuses" in name else "ok")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/RESULTS_arch.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checks = load_checks(Path(tmp))
        for family in CONFIGS:
            errors = quantized_errors(family, "int4:g32:asym")
            row = [family, f"{fold_error(family, 'awq'):.1e}", f"{fold_error(family, 'smoothquant'):.1e}",
                   gguf_agreement(family, Path(tmp))]
            row += [checks.get((family, "ct"), "-"), checks.get((family, "onnx"), "-")]
            row += [f"{errors[m]:.5f}" for m in ("rtn", "gptq", "awq", "awq+gptq")]
            rows.append(row)
            print(" | ".join(row), flush=True)
    header = ("| family | AWQ fold error | SmoothQuant fold error | GGUF F32: llama.cpp vs transformers | "
              "compressed-tensors in transformers | ONNX in onnxruntime | RTN | GPTQ | AWQ | AWQ+GPTQ |\n"
              "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |\n")
    text = (f"{TITLE}\n\nCommand: `.venv/bin/python bench/arch_table.py`. Tiny random models (hidden 64, 2 blocks, "
            "vocab 512) of each family in `lowbit.arch.families`, from transformers config classes. Fold errors: "
            "max |output change| / max |output| after folding a non-trivial AWQ / SmoothQuant scale into every "
            "table pair of every block. GGUF: max |log-prob difference| over 2 windows x 64 random tokens (F32 KV "
            "cache). compressed-tensors / ONNX: outcome of tests/export/test_families_export.py (W4A16 g32 "
            "checkpoint loaded by the real consumer and agreeing with lowbit's model to 1e-5 / 1e-4; GPT-2's "
            "Conv1D refusal is what its test checks). "
            "RTN..AWQ+GPTQ: int4 g32 asym on Linear weights, 8 x 64 random calibration tokens, error on 4 x 64 "
            "held-out random tokens (decoders: mean KLD of next-token distributions; encoders: relative MSE of "
            "the last hidden states). Random weights and tokens make these small and close together; they show "
            "that every method runs and stays finite on every family, not how much each helps on real models.\n\n")
    write_section(Path(args.out), TITLE, text + header + "\n".join(f"| {' | '.join(r)} |" for r in rows) + "\n")


if __name__ == "__main__":
    main()
