"""Timing a causal LM in its engine (tiny random Llama): the figures are finite and positive, a child process
reports its own peak memory, and failures are one-line errors, never a row."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.eval.speed import (LLAMA_CPP, ONNXRUNTIME, TRANSFORMERS, Speed, SpeedOptions, measure, measure_in_child,
                               open_stepper, peak_rss_bytes, timed_run)
from tests.arch_models import save_tiny

OPTS = SpeedOptions(prompt_tokens=16, new_tokens=4, runs=2, threads=1)
PROMPT = list(range(5, 5 + 16))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama's float graph with a KV cache and without one, its Q8_0 GGUF and its folder."""
    from lowbit.export.gguf import GGUFExportOptions, export_gguf
    from lowbit.export.onnx import OnnxExportOptions, export_onnx

    root = tmp_path_factory.mktemp("speed")
    folder = save_tiny("llama", root / "hf", seed=2)
    out = {"hf": folder, "gguf": root / "q8.gguf"}
    export_gguf(GGUFExportOptions(model=str(folder), type="Q8_0", out=str(out["gguf"]), method="rtn"), progress=False)
    for name, kv in (("kv", True), ("window", False)):
        out[name] = root / f"{name}.onnx"
        export_onnx(OnnxExportOptions(model=str(folder), mode="float", out=str(out[name]), kv_cache=kv))
    return out


def _finite_positive(speed: Speed) -> None:
    for value in (speed.prompt_tps, speed.decode_tps, speed.ttft_s, speed.peak_rss_bytes, speed.load_s):
        assert math.isfinite(value) and value > 0


def test_engine_names_are_the_generation_engines():
    from lowbit.eval import engines

    assert (LLAMA_CPP, ONNXRUNTIME, TRANSFORMERS) == (engines.LLAMA_CPP, engines.ONNXRUNTIME, engines.TRANSFORMERS)


def test_measure_here_and_in_a_child_process(graphs):
    here = measure(ONNXRUNTIME, graphs["kv"], PROMPT, OPTS)
    _finite_positive(here)
    child = measure_in_child(ONNXRUNTIME, graphs["kv"], PROMPT, OPTS)
    _finite_positive(child)
    # the child holds onnxruntime and numpy only: far less than this process, which has torch and transformers
    assert child.peak_rss_bytes < peak_rss_bytes()


def test_a_timed_run_decodes_the_asked_number_of_steps(graphs):
    from lowbit.eval.speed import OnnxStepper

    class Counting(OnnxStepper):
        steps = 0

        def step(self, token):
            Counting.steps += 1
            return super().step(token)

    prompt_s, ttft_s, decode_s = timed_run(Counting(graphs["kv"], 1), PROMPT, 5)
    assert Counting.steps == 5 and 0 < prompt_s <= ttft_s and decode_s > 0


@pytest.mark.parametrize("engine", [LLAMA_CPP, ONNXRUNTIME, TRANSFORMERS])
def test_the_timed_steps_decode_what_the_engine_generates(graphs, engine):
    """The steppers read the right logits: their greedy tokens are the generation engines' (lowbit generate)."""
    from lowbit.eval.engines import LlamaCppLM, OnnxLM, TransformersLM, inspect_target, load_transformers
    from lowbit.eval.generation import greedy_continuation

    path = {LLAMA_CPP: graphs["gguf"], ONNXRUNTIME: graphs["kv"], TRANSFORMERS: graphs["hf"]}[engine]
    stepper = open_stepper(engine, path, 64, 1)
    token = int(np.argmax(stepper.prefill(PROMPT)))
    tokens = [token]
    for _ in range(7):
        token = int(np.argmax(stepper.step(token)))
        tokens.append(token)
    reference = {LLAMA_CPP: lambda: LlamaCppLM(path, 64, 1), ONNXRUNTIME: lambda: OnnxLM(path, 1),
                 TRANSFORMERS: lambda: TransformersLM(load_transformers(inspect_target(path)))}[engine]()
    assert tokens == greedy_continuation(reference, PROMPT, 8)
    assert len(set(tokens)) > 1


def test_failures_are_one_line_errors(graphs, tmp_path):
    with pytest.raises(LowbitError, match=r"measuring .*window.onnx in onnxruntime failed: .*window.onnx has no KV "
                                          r"cache"):
        measure_in_child(ONNXRUNTIME, graphs["window"], PROMPT, OPTS)
    with pytest.raises(LowbitError, match=r"missing.onnx in onnxruntime failed: .*missing.onnx does not exist"):
        measure_in_child(ONNXRUNTIME, tmp_path / "missing.onnx", PROMPT, OPTS)
    with pytest.raises(LowbitError, match=r"unknown engine 'vllm'"):
        measure("vllm", graphs["kv"], PROMPT, OPTS)
    with pytest.raises(LowbitError, match=r"gave decode_tps = nan; a speed measurement must be finite and positive"):
        Speed(1.0, float("nan"), 1.0, 1, 1.0).check("x")
    with pytest.raises(LowbitError, match="at least 1"):
        SpeedOptions(runs=0)
