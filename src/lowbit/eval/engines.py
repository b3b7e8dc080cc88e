"""A causal LM's next-token logits in the engine its file is for: transformers for lowbit output folders and
Hugging Face folders (compressed-tensors among them), llama.cpp (llama-cpp-python) for GGUF files, onnxruntime
for ONNX graphs. Each engine is a ``NextTokenLogits`` callable (``lowbit.eval.generation``) that keeps its own
cache: every engine feeds only the tokens a call adds to the previous call's ids (its KV cache holds the rest;
for ONNX, the present key/values of lowbit's KV-cache graph; an older graph without one reruns the sequence).

``inspect_target`` looks at a path before anything heavy is loaded — which engine, which original it was
made from, its context length, and for GGUF whether it carries a tokenizer — so that bad input fails at once
with a one-line error naming the file.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError

TRANSFORMERS, LLAMA_CPP, ONNXRUNTIME = "transformers", "llama.cpp", "onnxruntime"
ONNX_FILE = "model.onnx"
EXPORT_MANIFEST = "lowbit_export.json"  # written by lowbit export hf/gptq/awq beside the weights


def _threads(threads: int | None) -> int:
    return threads or min(2, os.cpu_count() or 1)


class TransformersLM:
    """Next-token logits of a transformers causal LM (float32 numpy), with a KV cache kept between calls."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        # transformers 5 renamed the forward argument (and output) past_key_values to cache: use what this takes
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._ids: list[int] = []
        self._cache = None

    @torch.inference_mode()
    def __call__(self, ids: Sequence[int]) -> np.ndarray:
        ids = list(ids)
        n = len(self._ids)
        if self._cache is None or n >= len(ids) or ids[:n] != self._ids:
            self._cache, n = None, 0  # not an extension of the cached sequence: start again
        out = self.model(input_ids=torch.tensor([ids[n:]], device=self.device), use_cache=True,
                         **{self._cache_arg: self._cache})
        self._cache, self._ids = getattr(out, self._cache_arg), ids
        return out.logits[0, -1].float().cpu().numpy()

    def close(self) -> None:
        self._cache, self._ids = None, []


class LlamaCppLM:
    """Next-token logits of a GGUF file in llama.cpp, whose KV cache keeps the tokens already evaluated."""

    def __init__(self, path: str | Path, n_ctx: int, threads: int | None = None):
        try:
            import llama_cpp
        except ImportError:
            raise LowbitError("generating with a GGUF file needs llama-cpp-python: "
                              "pip install llama-cpp-python") from None
        try:
            self.llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                                       n_threads=_threads(threads), verbose=False)
        except ValueError as exc:
            raise LowbitError(f"llama.cpp cannot load {path}: {exc}") from None

    def __call__(self, ids: Sequence[int]) -> np.ndarray:
        ids = list(ids)
        n = self.llm.n_tokens
        if n == 0 or n >= len(ids) or self.llm.input_ids[:n].tolist() != ids[:n]:
            self.llm.reset()
            n = 0
        self.llm.eval(ids[n:])
        return np.array(self.llm.scores[len(ids) - 1], dtype=np.float32)

    def close(self) -> None:
        self.llm.close()


class OnnxLM:
    """Next-token logits of an ONNX causal-LM graph in onnxruntime. A KV-cache graph (what lowbit writes) is fed
    only the tokens a call adds, with the previous call's present key/values as its past; an older whole-window
    graph (``input_ids`` -> ``logits``) reruns the whole sequence at every call. ``config``: onnxruntime
    session config entries (see ``lowbit.eval.onnxruntime_lm.onnx_session``)."""

    def __init__(self, path: str | Path, threads: int | None = None, config: dict[str, str] | None = None):
        from lowbit.eval.onnxruntime_lm import OnnxCausalLM

        self.lm = OnnxCausalLM(path, threads, config=config)
        self._ids: list[int] = []
        self._past: list[np.ndarray] | None = None

    def __call__(self, ids: Sequence[int]) -> np.ndarray:
        ids = list(ids)
        if not self.lm.layout.has_cache:
            logits, _ = self.lm.run(np.array([ids]))
            return np.asarray(logits[0, -1], dtype=np.float32)
        n = len(self._ids)
        if self._past is None or n >= len(ids) or ids[:n] != self._ids:
            self._past, n = None, 0  # not an extension of the cached sequence: start again
        logits, self._past = self.lm.run(np.array([ids[n:]]), self._past)
        self._ids = ids
        return np.asarray(logits[0, -1], dtype=np.float32)

    def close(self) -> None:
        self.lm.close()
        self._past, self._ids = None, []


@dataclass(frozen=True)
class Target:
    """The model a generation run judges: ``kind`` lowbit | hf | gguf | onnx, the engine that runs it, the
    original it was made from where the files say (else None), its context length where known, and for GGUF
    files the token strings of its vocabulary."""

    path: Path
    kind: str
    engine: str
    original: str | None
    context: int | None
    vocabulary: tuple[str, ...] | None = None


def inspect_target(path: str | Path) -> Target:
    """What ``path`` is and how to run it, from its small files only (no weights are loaded)."""
    path = Path(path)
    if not path.exists():
        raise LowbitError(f"{path} does not exist; give a lowbit output folder, a Hugging Face folder, a .gguf or "
                          "an .onnx file")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            return _inspect_gguf(path)
        if suffix == ".onnx":
            return Target(path, "onnx", ONNXRUNTIME, None, _config_context(path.parent))
        raise LowbitError(f"{path} is neither a .gguf nor an .onnx file; give one of those or a model folder")
    if (path / ONNX_FILE).is_file():
        return Target(path / ONNX_FILE, "onnx", ONNXRUNTIME, None, _config_context(path))
    if not (path / "config.json").is_file():
        raise LowbitError(f"{path} has no config.json (nor {ONNX_FILE}); give a lowbit output folder or a Hugging "
                          "Face folder")
    from lowbit.model.checkpoint import MANIFEST_FILE, read_manifest

    if (path / MANIFEST_FILE).is_file():
        return Target(path, "lowbit", TRANSFORMERS, read_manifest(path).get("source"), _config_context(path))
    made_from = _read_json(path / EXPORT_MANIFEST).get("made_from") or {}
    return Target(path, "hf", TRANSFORMERS, made_from.get("source"), _config_context(path))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise LowbitError(f"{path} is not valid JSON") from None
    return data if isinstance(data, dict) else {}


def _config_context(folder: Path) -> int | None:
    """max_position_embeddings (or n_positions) from ``folder``/config.json, if it says."""
    config = _read_json(folder / "config.json")
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(config.get(key), int):
            return config[key]
    text = config.get("text_config")
    return text.get("max_position_embeddings") if isinstance(text, dict) else None


def _inspect_gguf(path: Path) -> Target:
    """A GGUF's context length and vocabulary; one without a tokenizer is refused (llama.cpp cannot generate
    text from it, and its token ids could not be checked against the original's)."""
    from lowbit.model.load import validate_gguf

    reader = validate_gguf(path)
    fields = reader.fields
    if "tokenizer.ggml.tokens" not in fields:
        raise LowbitError(f"{path} has no tokenizer (no tokenizer.ggml.tokens in its metadata); generation needs "
                          "one: write the file with its tokenizer (lowbit export gguf does)")
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else ""
    context = fields.get(f"{arch}.context_length")
    return Target(path, "gguf", LLAMA_CPP, None, int(context.contents()) if context else None,
                  tuple(fields["tokenizer.ggml.tokens"].contents()))


def check_vocabulary(target: Target, tokenizer, original: str) -> None:
    """A GGUF's token strings must be the original tokenizer's (the prompts are the original's token ids, fed to
    llama.cpp as they are): more than 1% different strings over the shared ids is an error."""
    if target.vocabulary is None:
        return
    n = min(len(target.vocabulary), len(tokenizer))
    theirs = tokenizer.convert_ids_to_tokens(list(range(n)))
    differ = sum(a != b for a, b in zip(target.vocabulary[:n], theirs))
    if n == 0 or differ > 0.01 * n:
        raise LowbitError(f"{target.path}'s vocabulary differs from the tokenizer of {original} ({differ} of {n} "
                          "tokens); pass --original with the model the file was made from")


def open_engine(target: Target, n_ctx: int, threads: int | None = None):
    """The ``NextTokenLogits`` callable (with a ``close()``) for ``target``; ``n_ctx`` is the longest sequence
    it will see (llama.cpp sizes its KV cache by it)."""
    if target.engine == LLAMA_CPP:
        return LlamaCppLM(target.path, n_ctx, threads)
    if target.engine == ONNXRUNTIME:
        return OnnxLM(target.path, threads)
    return TransformersLM(load_transformers(target))


def load_transformers(target: Target) -> torch.nn.Module:
    """A lowbit folder through lowbit's checkpoint reader (fake-quant float32), any other folder through
    ``AutoModelForCausalLM.from_pretrained`` (compressed-tensors decompresses itself on load)."""
    if target.kind == "lowbit":
        from lowbit.model.checkpoint import load_checkpoint

        model, _, manifest = load_checkpoint(target.path)
        if manifest.get("kind") not in (None, "causal-lm"):
            raise LowbitError(f"{target.path} holds an encoder ({manifest.get('kind')}); generation needs a causal LM")
        return model
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(target.path), dtype=torch.float32).eval()
    except (ValueError, OSError, KeyError, ImportError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LowbitError(f"transformers cannot load {target.path} as a causal LM: {first}") from None
