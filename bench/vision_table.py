"""The seeds' ResNet table, measured: ResNet-50 (random init) as FP32, FP16 and INT8 QDQ ONNX, file size and
onnxruntime CPU latency (batch 1, 3x224x224, 2 threads, warm-up then the median of interleaved runs), with
the digits ResNet's test accuracy as float, INT8 PTQ, W4A4 QAT and XNOR QAT.

INT8 files store full-range 8-bit weight codes as uint8 around zero point 128 (onnxruntime's exact uint8 x uint8
kernel; lowbit.vision.onnx_export says why). W7A8 files keep 7-bit weight codes as int8: the fast uint8 x int8
kernel, exact on every CPU. The row "INT8, int8 weights" is the INT8 file with its codes shifted back to int8
(zero point 0): the fast kernel, but it saturates on AVX2 CPUs without VNNI. It is written here only, to show
what the exact layout of full 8-bit weights costs.

Usage: ``.venv/bin/python bench/vision_table.py [--runs 20] [--out bench/RESULTS_vision.md]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from lowbit.hardware import kernel_class  # noqa: E402
from lowbit.vision.table import (digits_accuracies, export_resnet50, markdown_table, measure_latency,  # noqa: E402
                                 print_vision_table)


def with_int8_weights(path: Path, out: Path) -> Path:
    """``path`` with every uint8 weight initializer (and its zero point 128) shifted to int8 (zero point 0)."""
    model = onnx.load(path)
    for init in model.graph.initializer:
        if init.name.endswith((".weight_codes", ".weight_zero_point")):
            array = numpy_helper.to_array(init)
            if array.dtype == np.uint8:
                init.CopyFrom(numpy_helper.from_array((array.astype(np.int16) - 128).astype(np.int8), init.name))
    onnx.save(model, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS_vision.md"))
    args = parser.parse_args()
    start = time.time()
    acc = digits_accuracies()
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_resnet50(Path(tmp))
        paths["int8, int8 weights"] = with_int8_weights(paths["int8"], Path(tmp) / "resnet50_int8_s8.onnx")
        rows = measure_latency(paths, runs=args.runs, threads=args.threads)
    print_vision_table(rows, acc)
    command = "`.venv/bin/python bench/vision_table.py" + (f" --runs {args.runs}" if args.runs != 20 else "") + "`"
    text = (f"# Vision: ResNet-50 ONNX size/latency and digits accuracy\n\nCommand: {command} "
            f"({time.time() - start:.0f} s on this machine, {kernel_class()}, {args.threads} onnxruntime threads, "
            f"{args.runs} interleaved timed runs after 3 warm-up runs each, nothing else running).\n\n"
            "ResNet-50: random initialization, BatchNorm folded; INT8 = per-channel 8-bit weights (full-range codes "
            "stored as uint8 around zero point 128: exact on every x86 CPU; 'int8 weights': the same values as int8, "
            "which onnxruntime's uint8 x int8 kernel saturates on AVX2 CPUs without VNNI); W7A8 = 7-bit weights "
            "(codes within +-64, stored as int8: the fast kernel, exact everywhere); static uint8 "
            "activations (percentile observer on 4 random images), QDQ graph that onnxruntime fuses into "
            "QLinearConv/QGemm. MB = 10^6 bytes. Digits: scikit-learn digits, 359 test images (1 image = 0.28 "
            "points); XNOR keeps the first conv and the last linear at int8.\n\n" + markdown_table(rows, acc) + "\n")
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
