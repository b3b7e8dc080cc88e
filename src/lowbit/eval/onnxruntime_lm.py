"""Evaluate a causal-LM ONNX graph (``input_ids`` -> ``logits``) in onnxruntime on the same token windows
lowbit evaluates: next-token log-probabilities per window, and the seconds the runs took."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from lowbit.errors import LowbitError


def onnx_session(path: str | Path, threads: int | None = None):
    """A CPU onnxruntime session for ``path`` with ``threads`` intra-op threads (default: up to 2)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise LowbitError("evaluating in onnxruntime needs onnxruntime: pip install 'lowbit[onnx]'") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid files
        raise LowbitError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None


def onnx_logprobs(path: str | Path, windows: torch.Tensor, threads: int | None = None
                  ) -> tuple[list[torch.Tensor], float]:
    """Per window (length L), the graph's log-probabilities [L-1, vocab], and the seconds spent in ``run``
    (batch 1, one whole window per call: prompt-processing speed, there is no KV cache in the graph)."""
    session = onnx_session(path, threads)
    out, seconds = [], 0.0
    for ids in windows:
        start = time.perf_counter()
        (logits,) = session.run(None, {"input_ids": ids[None].numpy()})
        seconds += time.perf_counter() - start
        out.append(torch.log_softmax(torch.from_numpy(logits[0, :-1]).float(), dim=-1))
    return out, seconds
