"""The seeds' ResNet table, measured: ResNet-50 as FP32, FP16 and INT8 (QDQ) ONNX, file size and onnxruntime
CPU latency at batch 1 in one run, next to the digits ResNet's accuracy under each scheme.

Latency: every session gets the same thread count; after warm-up the three models are timed in turn
(interleaved, so a noisy neighbour slows all of them alike) and the median of each is reported.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowbit.vision.digits import load_digits_split
from lowbit.vision.digits_model import DigitsNetConfig, digits_net
from lowbit.vision.fold import fold_batchnorm
from lowbit.vision.freeze import freeze
from lowbit.vision.onnx_export import export_onnx
from lowbit.vision.ptq import calibrate, prepare, quantize_cnn
from lowbit.vision.qat import QATConfig, train_qat
from lowbit.vision.resnet50 import resnet50
from lowbit.vision.train import accuracy

PRECISIONS = ("fp32", "fp16", "int8", "w7a8")


@dataclass(frozen=True)
class LatencyRow:
    """One ResNet-50 variant: ONNX file size in bytes and median latency in milliseconds."""

    precision: str
    size_bytes: int
    median_ms: float


def export_resnet50(workdir: Path, image_size: int = 224, calibration_images: int = 4, seed: int = 0,
                    **model_kwargs) -> dict[str, Path]:
    """Write ResNet-50 (random init) as FP32, FP16 and QDQ ONNX (schemes int8 and w7a8) under ``workdir``;
    activations are calibrated (percentile observer, one pass) on seeded random images."""
    model = resnet50(seed=seed, **model_kwargs)
    shape = (3, image_size, image_size)
    folded = fold_batchnorm(model)
    paths = {p: export_onnx(folded, Path(workdir) / f"resnet50_{p}.onnx", shape, p) for p in ("fp32", "fp16")}
    images = torch.randn(calibration_images, *shape, generator=torch.Generator().manual_seed(seed))
    from lowbit.vision.schemes import get_scheme
    for name in ("int8", "w7a8"):
        qmodel = calibrate(prepare(model, get_scheme(name)), images, batch_size=calibration_images, sequential=False)
        paths[name] = export_onnx(qmodel, Path(workdir) / f"resnet50_{name}.onnx", shape, "qdq", freeze(qmodel))
    return paths


def measure_latency(paths: dict[str, Path], runs: int = 20, warmup: int = 3, threads: int = 2) -> list[LatencyRow]:
    """Median onnxruntime CPU latency at batch 1 of each model, timed interleaved after ``warmup`` runs each."""
    import onnxruntime as ort

    sessions, feeds = {}, {}
    for name, path in paths.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        dtype = np.float16 if "float16" in inp.type else np.float32
        shape = [1 if not isinstance(d, int) else d for d in inp.shape]
        sessions[name], feeds[name] = sess, {inp.name: np.random.default_rng(0).standard_normal(shape).astype(dtype)}
        for _ in range(warmup):
            sess.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(runs):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feeds[name])
            times[name].append(1000 * (time.perf_counter() - start))
    return [LatencyRow(name, Path(paths[name]).stat().st_size, statistics.median(times[name])) for name in paths]


def digits_accuracies(config: DigitsNetConfig = DigitsNetConfig()) -> dict[str, float]:
    """Digits test accuracy (percent) of the float net, INT8 and W7A8 PTQ, W4A4 QAT and XNOR QAT."""
    data = load_digits_split(config.split_seed)
    model = digits_net(config, data)
    calib = data.train_x[:512]
    return {
        "float": accuracy(model, data.test_x, data.test_y),
        "int8_ptq": accuracy(quantize_cnn(model, "int8", calib), data.test_x, data.test_y),
        "w7a8_ptq": accuracy(quantize_cnn(model, "w7a8", calib), data.test_x, data.test_y),
        "w4a4_qat": accuracy(train_qat(model, data.train_x, data.train_y, QATConfig("w4a4")), data.test_x, data.test_y),
        "xnor_qat": accuracy(train_qat(model, data.train_x, data.train_y, QATConfig("xnor")), data.test_x, data.test_y),
    }


def table_rows(rows: list[LatencyRow], accuracies: dict[str, float] | None) -> list[list[str]]:
    """Header and cells of the combined table (digits accuracy columns are the same in every row)."""
    fp32 = next(r for r in rows if r.precision == "fp32")
    head = ["ResNet-50 ONNX", "size (MB)", "latency (ms)", "speed vs FP32"]
    acc_cols = ["float", "int8_ptq", "w7a8_ptq", "w4a4_qat", "xnor_qat"]
    if accuracies:
        head += [f"digits {c} (%)" for c in acc_cols]
    out = [head]
    for r in rows:
        cells = [r.precision.upper(), f"{r.size_bytes / 1e6:.1f}", f"{r.median_ms:.1f}", f"{fp32.median_ms / r.median_ms:.2f}x"]
        if accuracies:
            cells += [f"{accuracies[c]:.2f}" for c in acc_cols]
        out.append(cells)
    return out


def print_vision_table(rows: list[LatencyRow], accuracies: dict[str, float] | None = None) -> None:
    """Print the table with rich."""
    from rich.console import Console
    from rich.table import Table

    head, *body = table_rows(rows, accuracies)
    table = Table(title="ResNet-50 ONNX (onnxruntime CPU, batch 1) and digits ResNet accuracy")
    for h in head:
        table.add_column(h, justify="left" if h == head[0] else "right")
    for cells in body:
        table.add_row(*cells)
    Console().print(table)


def markdown_table(rows: list[LatencyRow], accuracies: dict[str, float] | None = None) -> str:
    """The same table as Markdown."""
    head, *body = table_rows(rows, accuracies)
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
