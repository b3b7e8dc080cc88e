"""Calibrated methods vs RTN on the default model: bits per weight, PPL, KLD, top-1, seconds, peak RSS.

The original model's outputs on the evaluation windows (8 x 512 tokens of pydoc topics) are computed
once; calibration samples come from the tokens after them. Each configuration quantizes a fresh copy of
the float weights, is written as a real checkpoint (bits per weight are read from it), and is compared
with the original. Peak RSS is sampled during each configuration's quantization.

    .venv/bin/python bench/calibrated_table.py [--calib-samples 128] [--only gptq,awq] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import threading
import time
from pathlib import Path

from results_file import write_section

import os

import torch

from lowbit.data.text import calibration_windows, default_text, eval_windows, tokenize
from lowbit.eval.lm import compare_lm, lm_reference
from lowbit.eval.size import quantized_bits_per_weight
from lowbit.model.apply import quantize_model
from lowbit.model.checkpoint import WEIGHTS_FILE, write_checkpoint
from lowbit.model.load import load_model
from lowbit.pipeline.calibrated import quantize_calibrated
from lowbit.workflow import QuantizeOptions, cpu_has_bf16, build_recipe, recipe_needs_calibration

W = dict(group_size=128, symmetric=False)
ACT_ORDER = (("act_order", True),)
CONFIGS = [
    (f"{s} g128 asym", m, dict(scheme=s, method=m.split(" ")[0], method_options=o, **W))
    for s in ("W4A16", "W3A16")
    for m, o in (("rtn", ()), ("hqq", ()), ("gptq", ()), ("gptq act-order", ACT_ORDER), ("awq", ()),
                 ("awq+gptq act-order", ACT_ORDER))
] + [
    ("W8A8 int8 token dynamic", "rtn", dict(scheme="W8A8")),
    ("W8A8 int8 token dynamic", "smoothquant", dict(scheme="W8A8", method="smoothquant")),
] + [
    (f"W8A8 int8 tensor static {obs}", "rtn", dict(scheme="W8A8", activations=f"int8:tensor:static:{obs}"))
    for obs in ("minmax", "percentile", "mse", "kl")
] + [
    ("W8A8 int8 tensor static kl", "smoothquant", dict(scheme="W8A8", method="smoothquant",
                                                       activations="int8:tensor:static:kl")),
    ("NVFP4", "rtn", dict(scheme="NVFP4")),
    ("NVFP4", "gptq", dict(scheme="NVFP4", method="gptq")),
]


class PeakRSS:
    """Samples this process's RSS (Linux /proc) in a thread; ``peak_mb`` is the maximum seen while running."""

    def __enter__(self):
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while self.running:
            with open("/proc/self/statm") as statm:
                self.peak = max(self.peak, int(statm.read().split()[1]) * page)
            time.sleep(0.1)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-length", type=int, default=512)
    parser.add_argument("--calib-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 where the CPU has native bf16 (AVX512-BF16/AMX), else fp32")
    parser.add_argument("--only", help="comma-separated substrings: run configs whose label or method contains one")
    parser.add_argument("--out", default="bench/RESULTS.md")
    args = parser.parse_args()
    loaded = load_model("smollm2")
    ids = tokenize(loaded.tokenizer, default_text())
    ev = eval_windows(ids, 8, 512)
    calib = calibration_windows(ids, args.calib_samples, args.calib_length, ev.n_tokens).ids
    ref = lm_reference(loaded.model, ev.ids)
    if args.calib_dtype == "auto":
        args.calib_dtype = "bf16" if cpu_has_bf16() else "fp32"
    dtype = torch.bfloat16 if args.calib_dtype == "bf16" else torch.float32
    rows = []
    configs = [c for c in CONFIGS if not args.only or any(k in f"{c[0]} {c[1]}" for k in args.only.split(","))]
    n_configs = len(configs)
    for label, method, options in configs:
        model = copy.deepcopy(loaded.model)
        recipe = build_recipe(QuantizeOptions(**options))
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            if recipe_needs_calibration(recipe):
                qm = quantize_calibrated(model, recipe, calib, progress=False, compute_dtype=dtype)
            else:
                qm = quantize_model(model, recipe, progress=False)
            seconds = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(qm, Path(tmp), model.config, loaded.tokenizer, {})
            bpw = quantized_bits_per_weight(Path(tmp) / WEIGHTS_FILE)
        m = compare_lm(model, ref, progress=False)
        rows.append((label, method, bpw, m, seconds, rss.peak_mb))
        print(f"{label} | {method} | bpw {bpw:.3f} | ppl {m['ppl']:.3f} | kld {m['kld']:.4f} | top1 {m['top1']:.4f} "
              f"| {seconds:.1f}s | {rss.peak_mb:.0f} MB", file=sys.stderr, flush=True)
        del model, qm
        _write(args, rows, ref.ppl, done=len(rows) == n_configs)


def _write(args, rows, ppl_base, done: bool) -> None:
    """Rewrite the section after every row, so an interrupted run keeps what it measured."""
    command = " ".join(["python", *sys.argv])
    title = (f"## Calibrated methods on SmolLM2-135M ({args.calib_samples} x {args.calib_length} calibration tokens, "
             f"{args.calib_dtype} calibration passes)")
    lines = [title, "",
             f"Command: `{command}`. Evaluation: 8 x 512 tokens of pydoc topics (original PPL {ppl_base:.3f}); "
             "calibration samples are drawn from the tokens after them. The default model's float weights are "
             "dequantized Q4_1 (asym 4-bit, blocks of 32), which flatters 4-bit asymmetric grids. Seconds and "
             "peak RSS (sampled during quantization, whole process incl. the loaded model and the reference "
             "log-probs) were measured on the shared 2-core machine; compare them as ratios within this table.",
             *([] if done else ["", f"(partial: {len(rows)} rows so far, the run was still going)"]),
             "", "| config | method | bpw | PPL | KLD | top-1 | seconds | peak RSS MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, method, bpw, m, seconds, rss in rows:
        lines.append(f"| {label} | {method} | {bpw:.3f} | {m['ppl']:.3f} | {m['kld']:.4f} | {m['top1']:.4f} "
                     f"| {seconds:.0f} | {rss:.0f} |")
    text = "\n".join(lines) + "\n"
    if done:
        print(text)
    write_section(Path(args.out), title, text)


if __name__ == "__main__":
    main()
