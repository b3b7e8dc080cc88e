"""Run a causal-LM ONNX graph in onnxruntime: the KV-cache graph lowbit writes (``lowbit.export.onnx_kv``:
input_ids, attention_mask, position_ids and past key/values in; logits and present key/values out) or the
older whole-window graph (``input_ids`` [and ``attention_mask``] -> ``logits``).

``OnnxCausalLM`` checks the graph's inputs and outputs once, then ``run`` feeds new tokens with a past (or an
empty past, which makes the KV graph a whole-window graph), building the attention mask and position ids the
way the graph expects and checking a caller's past against the graph's layout. ``onnx_logprobs`` evaluates
either kind on the same token windows lowbit evaluates. No torch is imported here except by
``onnx_logprobs``, so a process that only times the graph holds nothing but onnxruntime.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
_WINDOW_INPUTS = {"input_ids", "attention_mask"}
_KV_INPUTS = {"input_ids", "attention_mask", "position_ids"}


def onnx_session(path: str | Path, threads: int | None = None, config: Mapping[str, str] | None = None):
    """A CPU onnxruntime session for ``path`` with ``threads`` intra-op threads (default: up to 2) and session
    ``config`` entries. onnxruntime's defaults are kept otherwise: among them, it fuses a blocked int4
    DequantizeLinear + MatMul into its MatMulNBits at accuracy level 4 (int8 activations), which
    ``{"session.qdq_matmulnbits_accuracy_level": "0"}`` turns into the float computation the graph describes."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise LowbitError("evaluating in onnxruntime needs onnxruntime: pip install 'lowbit[onnx]'") from None
    if not Path(path).is_file():
        raise LowbitError(f"{path} does not exist; give an .onnx file or a folder with model.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid files
        raise LowbitError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None


@dataclass(frozen=True)
class GraphLayout:
    """What a causal-LM graph takes: ``layers`` past key/value pairs of [batch, kv_heads, past, head_dim]
    (0 layers: a whole-window graph without a cache) and the integer type of each id input."""

    layers: int
    kv_heads: int
    head_dim: int
    id_types: tuple[tuple[str, str], ...]

    @property
    def has_cache(self) -> bool:
        return self.layers > 0


def graph_layout(session, path: str | Path) -> GraphLayout:
    """The layout of the graph in ``session``; a graph that is neither a KV-cache causal-LM graph nor a
    whole-window one is refused in one line naming what it has."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    past = {name for name in inputs if _PAST.match(name)}
    layers = len(past) // 2
    expected_past = {f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")}
    expected_present = {f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")}
    plain = set(inputs) - past
    kv_graph = (bool(past) and past == expected_past and plain == _KV_INPUTS and expected_present <= outputs)
    window_graph = not past and "input_ids" in inputs and plain <= _WINDOW_INPUTS
    if "logits" not in outputs or not (kv_graph or window_graph):
        raise LowbitError(f"{path} is not a causal-LM graph lowbit can run: it needs the inputs input_ids, "
                          "attention_mask, position_ids and past_key_values.N.key/value with the outputs logits and "
                          "present.N.key/value (KV cache), or input_ids alone with logits; it has inputs "
                          f"{', '.join(inputs) or 'none'} and outputs {', '.join(sorted(outputs)) or 'none'}")
    id_types = tuple((name, "int32" if inputs[name].type == "tensor(int32)" else "int64") for name in plain)
    if not kv_graph:
        return GraphLayout(0, 0, 0, id_types)
    shape = inputs["past_key_values.0.key"].shape
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise LowbitError(f"{path}: past_key_values.0.key has shape {shape}; a KV-cache graph needs "
                          "[batch, kv_heads, past_sequence, head_dim] with fixed heads and head size")
    return GraphLayout(layers, shape[1], shape[3], id_types)


class OnnxCausalLM:
    """A causal-LM graph in an onnxruntime session. ``run(ids, past)`` -> (logits [batch, new, vocab], present)
    where ``past``/``present`` are the flat list k0, v0, k1, v1, ... (None/empty for a graph without a cache)."""

    def __init__(self, path: str | Path, threads: int | None = None, require_cache: bool = False,
                 config: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.session = onnx_session(path, threads, config)
        self.layout = graph_layout(self.session, path)
        if require_cache and not self.layout.has_cache:
            raise LowbitError(f"{path} has no KV cache (inputs past_key_values.N.key/value); re-export it with "
                              "'lowbit export onnx' (causal LMs get a KV-cache graph by default)")
        pairs = [(i, kind) for i in range(self.layout.layers) for kind in ("key", "value")]
        self._past_names = [f"past_key_values.{i}.{kind}" for i, kind in pairs]
        self._outputs = ["logits"] + [f"present.{i}.{kind}" for i, kind in pairs]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A past of length 0 for ``batch`` rows (the KV graph then computes a whole window)."""
        shape = (batch, self.layout.kv_heads, 0, self.layout.head_dim)
        return [np.zeros(shape, np.float32) for _ in range(2 * self.layout.layers)]

    def run(self, ids: np.ndarray, past: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits of the new tokens ``ids`` [batch, new] after ``past`` (all rows unpadded), and the new past."""
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise LowbitError(f"token ids must be a non-empty [batch, tokens] integer array, got shape {ids.shape} "
                              f"of {ids.dtype}")
        batch, new = ids.shape
        if not self.layout.has_cache:
            if past:
                raise LowbitError(f"{self.path} has no KV cache: it takes no past, run the whole sequence")
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            return self.session.run(["logits"], self._typed(feed))[0], []
        past = self.empty_past(batch) if past is None else list(past)
        length = self._check_past(past, batch)
        feed = {"input_ids": ids, "attention_mask": np.ones((batch, length + new), np.int64),
                "position_ids": np.broadcast_to(np.arange(length, length + new), (batch, new))}
        feed = {**self._typed(feed), **dict(zip(self._past_names, past))}
        logits, *present = self.session.run(self._outputs, feed)
        return logits, present

    def _typed(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(feed[name], dtype=kind) for name, kind in self.layout.id_types}

    def _check_past(self, past: list[np.ndarray], batch: int) -> int:
        """The past's length, after checking it has the graph's layout (one line naming what is wrong)."""
        want = 2 * self.layout.layers
        if len(past) != want:
            raise LowbitError(f"the past has {len(past)} arrays; {self.path.name} has {self.layout.layers} layers, "
                              f"so it takes {want} (key and value of each layer)")
        shapes = sorted({tuple(np.shape(p)) for p in past})
        first = shapes[0]
        fits = len(first) == 4 and (first[0], first[1], first[3]) == (batch, self.layout.kv_heads, self.layout.head_dim)
        if len(shapes) != 1 or not fits:
            raise LowbitError(f"every past array must have shape [batch {batch}, kv_heads {self.layout.kv_heads}, "
                              f"past length, head_dim {self.layout.head_dim}], all of one length; got "
                              f"{', '.join(str(list(s)) for s in shapes)}")
        if any(np.asarray(p).dtype != np.float32 for p in past):
            raise LowbitError("the past arrays must be float32, as the graph's present outputs are")
        return int(first[2])

    def close(self) -> None:
        self.session = None


def onnx_logprobs(path: str | Path, windows, threads: int | None = None) -> tuple[list, float]:
    """Per window (length L), the graph's log-probabilities [L-1, vocab] (torch), and the seconds spent in
    ``run`` (batch 1, one whole window per call with an empty past: prompt-processing speed)."""
    import torch

    lm = OnnxCausalLM(path, threads)
    out, seconds = [], 0.0
    for ids in windows:
        start = time.perf_counter()
        logits, _ = lm.run(ids[None].numpy())
        seconds += time.perf_counter() - start
        out.append(torch.log_softmax(torch.from_numpy(logits[0, :-1]).float(), dim=-1))
    return out, seconds
