"""The seeds' ResNet table, measured: ResNet-50 (random init) as FP32, FP16 and INT8 QDQ ONNX, file size and
onnxruntime CPU latency (batch 1, 3x224x224, 2 threads, warm-up then the median of interleaved runs), with
the digits ResNet's test accuracy as float, INT8 PTQ, W4A4 QAT and XNOR QAT.

Usage: ``.venv/bin/python bench/vision_table.py [--runs 20] [--out bench/RESULTS_vision.md]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.vision.table import (digits_accuracies, export_resnet50, markdown_table, measure_latency,  # noqa: E402
                                 print_vision_table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS_vision.md"))
    args = parser.parse_args()
    start = time.time()
    acc = digits_accuracies()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure_latency(export_resnet50(Path(tmp)), runs=args.runs, threads=args.threads)
    print_vision_table(rows, acc)
    command = "`.venv/bin/python bench/vision_table.py" + (f" --runs {args.runs}" if args.runs != 20 else "") + "`"
    text = (f"# Vision: ResNet-50 ONNX size/latency and digits accuracy\n\nCommand: {command} "
            f"({time.time() - start:.0f} s on this machine, {args.threads} onnxruntime threads, {args.runs} "
            "interleaved timed runs after 3 warm-up runs each; another benchmark shared the 2 CPU cores).\n\n"
            "ResNet-50: random initialization, BatchNorm folded; INT8 = per-channel int8 weights, static uint8 "
            "activations (percentile observer on 4 random images), QDQ graph that onnxruntime fuses into "
            "QLinearConv/QGemm. MB = 10^6 bytes. Digits: scikit-learn digits, 359 test images (1 image = 0.28 "
            "points); XNOR keeps the first conv and the last linear at int8.\n\n" + markdown_table(rows, acc) + "\n")
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
