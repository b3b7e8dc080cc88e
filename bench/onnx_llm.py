"""The default LLM (SmolLM2-135M) as ONNX in onnxruntime: size, PPL / KLD / top-1 against the original
(torch, float) on lowbit's evaluation windows, and prompt-processing tokens per second against fp32 ONNX.

    .venv/bin/python bench/onnx_llm.py [--calib-samples 32] [--out bench/RESULTS_onnx.md]

One lowbit checkpoint (W4A16 g128 asym, GPTQ with act-order, calibration passes in the default dtype) is written by
``lowbit quantize --format lowbit,onnx``; its report holds lowbit's own evaluation of the same weights.
The ONNX files: the float graph (``lowbit export onnx smollm2 --mode float``), the checkpoint with
MatMulNBits at accuracy level 0 (float compute, what lowbit evaluated) and at level 4 (int8 activations
inside the kernel), and the checkpoint as blocked QDQ. Timings: batch 1, one 512-token window per call,
2 threads, all files measured one after the other in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from results_file import write_section

from lowbit.cli import main as lowbit
from lowbit.data.text import default_text, eval_windows, tokenize
from lowbit.eval.lm import lm_reference
from lowbit.eval.llamacpp import compare_logprobs
from lowbit.eval.onnxruntime_lm import onnx_logprobs
from lowbit.model.load import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--out", default="bench/RESULTS_onnx.md")
    args = parser.parse_args()
    loaded = load_model("smollm2")
    windows = eval_windows(tokenize(loaded.tokenizer, default_text()), 8, 512).ids
    ref = lm_reference(loaded.model, windows, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "w4"
        run(["quantize", "--scheme", "W4A16", "--group-size", "128", "--asym", "--method", "gptq", "--act-order",
             "--calib-samples", str(args.calib_samples), "--out", str(ckpt),
             "--format", "lowbit,onnx", "--json"])
        report = json.loads((ckpt / "report.json").read_text())
        run(["export", "onnx", "smollm2", "--mode", "float", "--out", str(tmp / "fp32.onnx"), "--json"])
        run(["export", "onnx", str(ckpt), "--accuracy-level", "4", "--out", str(tmp / "nbits4.onnx"), "--json"])
        run(["export", "onnx", str(ckpt), "--mode", "qdq", "--out", str(tmp / "qdq.onnx"), "--json"])
        files = [("fp32 (float graph)", tmp / "fp32.onnx"),
                 ("W4A16 MatMulNBits, accuracy 0", tmp / "w4-onnx" / "model.onnx"),
                 ("W4A16 MatMulNBits, accuracy 4", tmp / "nbits4.onnx"),
                 ("W4A16 blocked QDQ (onnxruntime fuses it)", tmp / "qdq.onnx")]
        rows = []
        for label, path in files:
            lp, seconds = onnx_logprobs(path, windows, threads=2)
            m = compare_logprobs(ref.logprobs, lp, windows)
            rows.append((label, path.stat().st_size / 1e6, m, windows.numel() / seconds))
            print(f"{label}: {rows[-1][1]:.1f} MB ppl {m['ppl']:.3f} kld {m['kld']:.4f} top1 {m['top1']:.4f} "
                  f"{rows[-1][3]:.0f} tok/s", file=sys.stderr, flush=True)
    write(args, report, rows, ref.ppl)


def run(argv: list[str]) -> None:
    if lowbit(argv) != 0:
        raise SystemExit(f"lowbit {' '.join(argv)} failed")


def write(args, report: dict, rows: list, ppl_base: float) -> None:
    title = "## SmolLM2-135M in onnxruntime (W4A16 as MatMulNBits)"
    base_speed = rows[0][3]
    ev = report["eval"]
    lines = [title, "",
             f"Command: `python {' '.join(sys.argv)}`. 8 x 512 tokens of pydoc topics; reference = the original "
             f"model in torch (PPL {ppl_base:.3f}). Checkpoint: `lowbit quantize --scheme W4A16 --group-size 128 "
             f"--asym --method gptq --act-order --calib-samples {args.calib_samples} --format "
             "lowbit,onnx`; lowbit's own evaluation of it (torch, fake-quant): "
             f"PPL {ev['ppl']:.3f}, KLD {ev['kld']:.4f}, top-1 {ev['top1']:.4f}. The float weights are dequantized "
             "Q4_1 (asym 4-bit, blocks of 32), which flatters asymmetric 4-bit grids. tok/s: prompt processing, "
             "batch 1, one whole 512-token window per call (the graphs have a KV cache, given an empty past here; "
             "decode speed with the cache is in bench/RESULTS_speed.md), 2 threads; measured one file after the "
             "other in one process (compare as ratios).", "",
             "| graph | file MB | PPL | KLD | top-1 | tok/s | speed vs fp32 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, mb, m, speed in rows:
        lines.append(f"| {label} | {mb:.1f} | {m['ppl']:.3f} | {m['kld']:.4f} | {m['top1']:.4f} | {speed:.0f} "
                     f"| {speed / base_speed:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(Path(args.out), title, text)


if __name__ == "__main__":
    main()
