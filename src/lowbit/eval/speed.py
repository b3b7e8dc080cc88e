"""Speed and memory of a causal LM in the engine its file is for: prompt tokens per second, decode tokens per
second, time to first token and peak resident memory, each measurement in a fresh process.

One timed run: the cache is emptied, the prompt (``prompt_tokens`` ids) is evaluated in one call, the first
token is picked greedily from its last logits (prompt time + that pick = time to first token), then
``new_tokens`` single-token decode steps follow, each feeding the previous greedy token (no stop at an end
token, so every run decodes the same number of steps). After a short untimed warm-up, ``runs`` runs are
timed and each figure is their median. Engines: llama.cpp (llama-cpp-python; prompt and decode threads both
``threads``; only the last position's logits are computed), onnxruntime (a KV-cache graph,
``lowbit.eval.onnxruntime_lm``; ``threads`` intra-op threads), transformers (``torch.set_num_threads``;
lowbit folders run as their fake-quant float model, as ``lowbit eval`` does).

``measure_in_child`` runs ``measure`` in a new Python process (``python -m lowbit.eval.speed``) and reads
that process's peak RSS, so one engine's allocations never count against another's, and the child imports
only its engine (no torch for llama.cpp and onnxruntime).
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lowbit.errors import LowbitError

LLAMA_CPP, ONNXRUNTIME, TRANSFORMERS = "llama.cpp", "onnxruntime", "transformers"  # as lowbit.eval.engines
WARMUP_TOKENS = 8


@dataclass(frozen=True)
class SpeedOptions:
    """``prompt_tokens`` ids in the prompt, ``new_tokens`` decode steps, ``runs`` timed runs (median taken),
    ``threads`` CPU threads for the engine."""

    prompt_tokens: int = 512
    new_tokens: int = 64
    runs: int = 3
    threads: int = 2

    def __post_init__(self) -> None:
        if min(self.prompt_tokens, self.new_tokens, self.runs, self.threads) < 1:
            raise LowbitError("--prompt-tokens, --new-tokens, --runs and --threads must all be at least 1")


@dataclass(frozen=True)
class Speed:
    """One model in one engine: tokens per second of the prompt and of decoding, seconds to the first token,
    the process's peak resident memory in bytes, and the seconds loading took."""

    prompt_tps: float
    decode_tps: float
    ttft_s: float
    peak_rss_bytes: int
    load_s: float

    def check(self, what: str) -> "Speed":
        """This measurement, or a one-line error when a figure is not finite and positive."""
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise LowbitError(f"measuring {what} gave {name} = {value}; a speed measurement must be finite "
                                  "and positive (is the prompt or the model empty?)")
        return self


class Stepper(Protocol):
    """An engine with a KV cache: ``prefill`` empties the cache, evaluates the prompt and returns the last
    position's logits; ``step`` appends one token and returns its logits."""

    def prefill(self, ids: list[int]) -> np.ndarray: ...

    def step(self, token: int) -> np.ndarray: ...


class LlamaCppStepper:
    """A GGUF file in llama.cpp, computing only the last position's logits (as llama.cpp's own tools do)."""

    def __init__(self, path: str | Path, n_ctx: int, threads: int):
        try:
            import llama_cpp
        except ImportError:
            raise LowbitError("timing a GGUF file needs llama-cpp-python: pip install llama-cpp-python") from None
        self._llama_cpp = llama_cpp
        try:
            self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=threads,
                                       n_threads_batch=threads, logits_all=False, verbose=False)
        except ValueError as exc:
            raise LowbitError(f"llama.cpp cannot load {path}: {exc}") from None
        self._vocab = self.llm.n_vocab()

    def _logits(self) -> np.ndarray:
        pointer = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self._vocab,))

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return self._logits()

    def step(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return self._logits()


class OnnxStepper:
    """A KV-cache ONNX graph in onnxruntime: the prompt with an empty past, then one token per call."""

    def __init__(self, path: str | Path, threads: int):
        from lowbit.eval.onnxruntime_lm import OnnxCausalLM

        self.lm = OnnxCausalLM(path, threads, require_cache=True)
        self._past: list[np.ndarray] | None = None

    def prefill(self, ids: list[int]) -> np.ndarray:
        logits, self._past = self.lm.run(np.array([ids], dtype=np.int64))
        return logits[0, -1]

    def step(self, token: int) -> np.ndarray:
        logits, self._past = self.lm.run(np.array([[token]], dtype=np.int64), self._past)
        return logits[0, -1]


class TransformersStepper:
    """A lowbit or Hugging Face folder in transformers (float32, the model's own KV cache)."""

    def __init__(self, path: str | Path, threads: int):
        import inspect

        import torch

        from lowbit.eval.engines import inspect_target, load_transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = load_transformers(inspect_target(path))
        accepted = inspect.signature(self.model.forward).parameters
        # transformers 5 calls the cache argument ``cache`` (older: ``past_key_values``); logits of the last
        # position only, as ``generate`` computes them
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
        self._cache = None

    def _run(self, ids: list[int]) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor([ids]), use_cache=True, **self._extra,
                             **{self._cache_arg: self._cache})
        self._cache = getattr(out, self._cache_arg)
        return out.logits[0, -1].float().numpy()

    def prefill(self, ids: list[int]) -> np.ndarray:
        self._cache = None
        return self._run(ids)

    def step(self, token: int) -> np.ndarray:
        return self._run([token])


def open_stepper(engine: str, path: str | Path, n_ctx: int, threads: int) -> Stepper:
    """The ``Stepper`` for ``path`` in ``engine`` (llama.cpp, onnxruntime or transformers)."""
    if engine == LLAMA_CPP:
        return LlamaCppStepper(path, n_ctx, threads)
    if engine == ONNXRUNTIME:
        return OnnxStepper(path, threads)
    if engine == TRANSFORMERS:
        return TransformersStepper(path, threads)
    raise LowbitError(f"unknown engine {engine!r}; use {LLAMA_CPP}, {ONNXRUNTIME} or {TRANSFORMERS}")


def timed_run(stepper: Stepper, prompt: list[int], new_tokens: int) -> tuple[float, float, float]:
    """(prompt seconds, seconds to the first token, seconds of ``new_tokens`` decode steps) of one run."""
    start = time.perf_counter()
    logits = stepper.prefill(prompt)
    prompted = time.perf_counter()
    token = int(np.argmax(logits))
    first = time.perf_counter()
    for _ in range(new_tokens):
        token = int(np.argmax(stepper.step(token)))
    return prompted - start, first - start, time.perf_counter() - first


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes: Linux's VmHWM, which belongs to the memory map
    of this program (``getrusage``'s ru_maxrss would carry over the parent's resident size through fork and
    exec); elsewhere ru_maxrss."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def measure(engine: str, path: str | Path, prompt: list[int], opts: SpeedOptions) -> Speed:
    """Time ``path`` in ``engine`` in this process (``measure_in_child`` is the one to call: fresh memory)."""
    if len(prompt) != opts.prompt_tokens:
        raise LowbitError(f"the prompt has {len(prompt)} tokens, the options ask for {opts.prompt_tokens}")
    start = time.perf_counter()
    stepper = open_stepper(engine, path, opts.prompt_tokens + opts.new_tokens + 1, opts.threads)
    load_s = time.perf_counter() - start
    timed_run(stepper, prompt[:WARMUP_TOKENS], 2)  # first-call allocations and kernel selection, untimed
    runs = [timed_run(stepper, prompt, opts.new_tokens) for _ in range(opts.runs)]
    prompt_s, ttft_s, decode_s = (statistics.median(column) for column in zip(*runs))
    rates = (opts.prompt_tokens / prompt_s if prompt_s > 0 else math.inf,
             opts.new_tokens / decode_s if decode_s > 0 else math.inf)
    return Speed(rates[0], rates[1], ttft_s, peak_rss_bytes(), load_s).check(f"{path} in {engine}")


def measure_in_child(engine: str, path: str | Path, prompt: list[int], opts: SpeedOptions,
                     timeout_s: float | None = None) -> Speed:
    """``measure`` in a fresh Python process; its failure is a one-line error naming the file and the engine."""
    with tempfile.TemporaryDirectory(prefix="lowbit-speed-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"engine": engine, "path": str(path), "prompt": list(prompt),
                                       "options": asdict(opts)}))
        command = [sys.executable, "-m", "lowbit.eval.speed", str(request), str(result)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise LowbitError(f"measuring {path} in {engine} took more than {timeout_s:.0f} s") from None
        if done.returncode != 0 or not result.is_file():
            lines = [line for line in (done.stderr or "").splitlines() if line.strip()]
            last = lines[-1] if lines else f"exit code {done.returncode}"
            raise LowbitError(f"measuring {path} in {engine} failed: {last.removeprefix('lowbit: error: ')}")
        return Speed(**json.loads(result.read_text())).check(f"{path} in {engine}")


def main(argv: list[str]) -> int:
    """The child process: read the request, measure, write the result (a one-line error on stderr if not)."""
    from lowbit.memory import give_large_blocks_back

    give_large_blocks_back()  # as in every lowbit process, so freed large blocks do not stay resident
    request_path, result_path = argv
    request = json.loads(Path(request_path).read_text())
    try:
        speed = measure(request["engine"], request["path"], request["prompt"], SpeedOptions(**request["options"]))
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
    Path(result_path).write_text(json.dumps(asdict(speed)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
