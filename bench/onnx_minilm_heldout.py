"""Embedding cosine of the MiniLM ONNX files bench/onnx_minilm.py wrote, on text that is neither calibration
nor evaluation text: the docstrings of the standard library's modules (those longer than 200 characters, the
first 2,000 characters of each), against the traced fp32 graph. Writes a section of bench/RESULTS_onnx.md.

    .venv/bin/python bench/onnx_minilm_heldout.py [--out out/onnx_bench]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from onnx_minilm import LOWBIT, batches, cosines, run, session  # noqa: E402
from results_file import write_section  # noqa: E402

from lowbit.model.load import load_model  # noqa: E402

TITLE = "## ONNX: MiniLM int8 on held-out text (standard-library module docstrings)"
SKIP = ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo")
OTHERS = (("onnxruntime quantize_dynamic (int8, default) of the traced graph", "ort_dynamic"),
          ("onnxruntime quantize_dynamic (int8, per_channel) of the traced graph", "ort_dynamic_per_channel"))


def module_docstrings(least: int = 200, most: int = 2000) -> list[str]:
    """The standard library's module docstrings of more than ``least`` characters, whitespace collapsed."""
    docs = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - modules that do not import on this platform are skipped
            continue
        text = " ".join((module.__doc__ or "").split())
        if len(text) > least:
            docs.append(text[:most])
    return docs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/onnx_bench")
    args = ap.parse_args()
    out = Path(args.out)
    docs = module_docstrings()
    feeds = batches(load_model("minilm").tokenizer, docs, 32)
    reference = run(session(out / "fp32_traced.onnx", 2), feeds)
    lines = [TITLE, "", f"Command: `python {' '.join(sys.argv)}` (after bench/onnx_minilm.py wrote the files)", "",
             f"{len(docs)} module docstrings of this Python {sys.version.split()[0]} (longer than 200 characters, "
             "the first 2,000 of each, at most 128 tokens), batches of 32; cosine of each file's embedding to the "
             "traced fp32 graph's.", "", "| model | cosine mean | cosine min |", "|---|---|---|"]
    for label, name in [*OTHERS, *((label, name) for label, name, _ in LOWBIT)]:
        path = out / f"{name}.onnx"
        if not path.is_file():
            continue
        cos = cosines(reference, run(session(path, 2), feeds))
        lines.append(f"| {label} | {cos.mean():.4f} | {cos.min():.4f} |")
        print(lines[-1], flush=True)
    write_section(Path("bench/RESULTS_onnx.md"), TITLE, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
