"""The job behind ``lowbit generate``: greedy continuations of the same prompts from the float original (in
transformers) and from a quantized model in the engine its file is for, scored against each other.

The original is loaded first, its continuations are kept as token ids, and it is freed before the quantized
model is opened, so only one model is in memory at a time (as ``lowbit eval`` does). Both models see exactly
the same prompt token ids — the original tokenizer's, with no special tokens added — so the only difference
between the continuations is the model (and, for GGUF and ONNX, the engine's arithmetic).

With ``--original-engine llama.cpp`` the original (a GGUF file, e.g. an F16 one) runs in llama.cpp, as a GGUF
target does: both sides then share the engine, and its arithmetic (which alone makes greedy paths part at
near-ties) no longer counts against the quantized file. The tokenizer still comes from that file through
transformers.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lowbit import __version__
from lowbit.data.text import DEFAULT_TEXT_NAME
from lowbit.errors import LowbitError
from lowbit.eval.engines import LLAMA_CPP, TRANSFORMERS, Target, TransformersLM, check_vocabulary, inspect_target, open_engine
from lowbit.eval.generation import (Continuations, NextTokenLogits, chrf, continuation_text, divergence_span,
                                    generation_metrics, greedy_continuation, rouge_l)
from lowbit.eval.prompts import (DEFAULT_NEW_TOKENS, DEFAULT_PROMPTS, Prompt, default_prompts, encode_prompts,
                                 read_prompts)
from lowbit.io_utils import atomic_file
from lowbit.model.load import CAUSAL_LM, load_model, resolve_source

FORMAT = "lowbit-generation"
FORMAT_VERSION = 1
RESULT_FILE = "generation.json"
ORIGINAL_ENGINES = (TRANSFORMERS, LLAMA_CPP)


@dataclass(frozen=True)
class GenerateOptions:
    """``target``: the quantized model (lowbit or Hugging Face folder, .gguf, .onnx or a folder with model.onnx);
    ``original``: the float model it is judged against (default: what the target's files name, else the built-in
    SmolLM2); ``prompts``: a JSONL file (None: the built-in prompts); ``n_prompts``: how many (default 32
    built-in, all of a file); ``new_tokens``: tokens generated per prompt."""

    target: str
    original: str | None = None
    prompts: str | None = None
    n_prompts: int | None = None
    new_tokens: int = DEFAULT_NEW_TOKENS
    threads: int | None = None
    original_engine: str = TRANSFORMERS
    reuse_original: str | None = None

    def __post_init__(self) -> None:
        if self.original_engine not in ORIGINAL_ENGINES:
            raise LowbitError(f"--original-engine must be one of {', '.join(ORIGINAL_ENGINES)}, "
                              f"got {self.original_engine!r}")


def default_result_path(target: str | Path) -> Path:
    """Where the result goes by default: generation.json inside a folder, <stem>.generation.json beside a file."""
    target = Path(target)
    return target / RESULT_FILE if target.is_dir() else target.with_name(f"{target.stem}.{RESULT_FILE}")


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the generation config's (as ``model.generate`` stops)."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return {int(i) for i in ids if i is not None}


def _model_context(model: Any) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _continuations(lm: NextTokenLogits, prompts: list[list[int]], new_tokens: int, stop_ids: set[int], label: str,
                   progress: bool) -> tuple[list[list[int]], float]:
    """Greedy continuations of every prompt, and the seconds they took."""
    start = time.perf_counter()
    out = [greedy_continuation(lm, ids, new_tokens, stop_ids, label)
           for ids in tqdm(prompts, desc=f"generate {label}", disable=not progress)]
    return out, time.perf_counter() - start


def generate_job(opts: GenerateOptions, progress: bool = True) -> dict[str, Any]:
    """Continuations from the original and the quantized model, their metrics and every prompt's texts (the
    result ``lowbit ab page`` turns into an A/B page)."""
    if opts.n_prompts is not None and opts.n_prompts <= 0:
        raise LowbitError(f"--n-prompts must be positive, got {opts.n_prompts}")
    target = inspect_target(opts.target)
    prompts = read_prompts(opts.prompts, opts.n_prompts) if opts.prompts else None  # bad files fail before loading
    source = opts.original or _recorded_original(target)
    if opts.original_engine == LLAMA_CPP and resolve_source(source).suffix.lower() != ".gguf":
        raise LowbitError(f"--original-engine llama.cpp runs a GGUF original; {resolve_source(source)} is not a "
                          ".gguf file")
    loaded = load_model(source)
    if loaded.kind != CAUSAL_LM:
        raise LowbitError(f"{loaded.source} is an encoder; generation needs a causal language model")
    tokenizer, original = loaded.tokenizer, loaded.source
    check_vocabulary(target, tokenizer, original)
    prompts = prompts or default_prompts(tokenizer, opts.n_prompts or DEFAULT_PROMPTS)
    contexts = [c for c in (target.context, _model_context(loaded.model)) if c]
    context = min(contexts) if contexts else 1 << 30
    encoded = encode_prompts(tokenizer, prompts, opts.new_tokens, context, opts.prompts or "the built-in prompts")
    stop_ids = _stop_ids(loaded.model, tokenizer)
    n_ctx = max(len(ids) for ids in encoded) + opts.new_tokens
    # the transformers model is kept only when it generates; only one model is in memory at a time
    model = loaded.model if not opts.reuse_original and opts.original_engine == TRANSFORMERS else None
    del loaded
    gc.collect()
    if opts.reuse_original:
        reference, ref_seconds = _reused_reference(opts, original, encoded)
    else:
        reference, ref_seconds = _original_continuations(opts, model, original, encoded, n_ctx, stop_ids, progress)
    del model
    gc.collect()  # the original's weights go before the quantized model's arrive
    engine = open_engine(target, n_ctx, opts.threads)
    try:
        test, test_seconds = _continuations(engine, encoded, opts.new_tokens, stop_ids, "quantized", progress)
    finally:
        engine.close()
    items, pairs = _items(tokenizer, prompts, encoded, reference, test)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lowbit_version": __version__,
        "model": str(opts.target), "kind": target.kind, "engine": target.engine, "label": _label(target),
        "original": original, "original_engine": opts.original_engine, "decoding": "greedy",
        "prompts": {"source": opts.prompts or DEFAULT_TEXT_NAME, "count": len(prompts), "new_tokens": opts.new_tokens},
        "metrics": generation_metrics(pairs), "seconds": {"original": ref_seconds, "quantized": test_seconds},
        "items": items,
    }


def _original_continuations(opts: GenerateOptions, model: Any, original: str, encoded: list[list[int]], n_ctx: int,
                            stop_ids: set[int], progress: bool) -> tuple[list[list[int]], float]:
    """The original's greedy continuations in its engine: ``model`` in transformers, or the GGUF file
    ``original`` in llama.cpp (``model`` None)."""
    if opts.original_engine == LLAMA_CPP:
        lm = open_engine(inspect_target(original), n_ctx, opts.threads)
    else:
        lm = TransformersLM(model)
    try:
        return _continuations(lm, encoded, opts.new_tokens, stop_ids, "original", progress)
    finally:
        lm.close()


def _reused_reference(opts: GenerateOptions, original: str, encoded: list[list[int]]) -> tuple[list[list[int]], float]:
    """The original's continuations from an earlier result (``--reuse-original``), which must have been made from
    the same original in the same engine, on the same prompt ids, with the same number of new tokens."""
    path = Path(opts.reuse_original)
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        same = (earlier.get("format") == FORMAT and earlier["original"] == original
                and earlier["original_engine"] == opts.original_engine
                and earlier["prompts"]["new_tokens"] == opts.new_tokens
                and [item["prompt_ids"] for item in earlier["items"]] == encoded)
        reference = [list(item["original"]["ids"]) for item in earlier["items"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LowbitError(f"--reuse-original {path} is not a readable lowbit generation result "
                          f"({type(exc).__name__}: {exc})") from None
    if not same:
        raise LowbitError(f"--reuse-original {path} was not made from {original} in {opts.original_engine} on these "
                          f"prompts with {opts.new_tokens} new tokens; run without it")
    return reference, float(earlier.get("seconds", {}).get("original", 0.0))


def _recorded_original(target: Target) -> str | None:
    """The original the target's files name, checked to be here (a folder copied from another machine names a
    path that is not), so the error says what to do."""
    if target.original is None:
        return None
    try:
        resolve_source(target.original)
    except LowbitError:
        raise LowbitError(f"{target.path} was made from {target.original}, which is not on this machine; pass "
                          "--original with that model") from None
    return target.original


def _label(target: Target) -> str:
    """A short name of the quantized model for tables and pages: scheme and method of a lowbit folder, else
    the file's name."""
    if target.kind == "lowbit":
        from lowbit.model.checkpoint import read_manifest

        manifest = read_manifest(target.path)
        return f"{manifest.get('scheme')} {manifest.get('method')} ({target.path.name})"
    return target.path.name if target.path.name != "model.onnx" else target.path.parent.name


def _items(tokenizer: Any, prompts: list[Prompt], encoded: list[list[int]], reference: list[list[int]],
           test: list[list[int]]) -> tuple[list[dict[str, Any]], list[Continuations]]:
    """Per prompt: its token ids, both continuations (text, ids, and the span of the first differing token),
    the tokens to the first divergence, chrF and ROUGE-L; and the pairs the corpus metrics are computed from."""
    def decode(ids):
        return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    items, pairs = [], []
    for i, (prompt, ids, ref, out) in enumerate(zip(prompts, encoded, reference, test)):
        pair = Continuations(tuple(ref), tuple(out), continuation_text(decode, ids, ref),
                             continuation_text(decode, ids, out))
        k = pair.divergence
        sides = {name: {"text": text, "ids": list(seq),
                        "mark": None if pair.exact else list(divergence_span(decode, ids, seq, k, text))}
                 for name, seq, text in (("original", ref, pair.reference_text), ("quantized", out, pair.test_text))}
        items.append({"id": f"p{i}", "source": prompt.source, "prompt": prompt.text, "prompt_ids": list(ids),
                      **sides, "divergence": k, "exact": pair.exact,
                      "chrf": chrf(pair.reference_text, pair.test_text),
                      "rouge_l": rouge_l(pair.reference_text, pair.test_text)})
        pairs.append(pair)
    return items, pairs


def write_result(result: dict[str, Any], path: str | Path) -> Path:
    """The result as pretty-printed JSON at ``path`` (replaced atomically if it exists)."""
    path = Path(path)
    with atomic_file(path, force=True) as tmp:
        tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
