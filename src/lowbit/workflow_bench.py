"""The job behind ``lowbit bench llm``: speed and memory of quantized files in the engines they are for, each
beside the unquantized original in the same engine and the same run, as ratios.

Every target (a .gguf file, an .onnx KV-cache graph or a folder with model.onnx, a lowbit or Hugging Face
folder, or a built-in model name) is inspected first, so bad input fails before anything is loaded. The
original (``--original``, else what the targets' files name, else the built-in SmolLM2) is loaded once and
written once per engine that a target needs: an F16 GGUF for llama.cpp, the fp32 KV-cache graph for
onnxruntime, and a float folder for transformers (the source folder itself; a GGUF source, such as the
built-in SmolLM2, saved as one). Then each file is timed in a fresh process (``lowbit.eval.speed``), original
first, on the same prompt: the original tokenizer's ids of the default text.
"""

from __future__ import annotations

import gc
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.eval.engines import (LLAMA_CPP, ONNX_FILE, ONNXRUNTIME, TRANSFORMERS, Target, check_vocabulary,
                                 inspect_target)
from lowbit.eval.speed import SpeedOptions, measure_in_child
from lowbit.model.load import DEFAULT_LLM, resolve_source

FORMAT = "lowbit-speed"
FORMAT_VERSION = 1
ORIGINAL_LABELS = {LLAMA_CPP: "original (F16 GGUF)", ONNXRUNTIME: "original (fp32 ONNX)",
                   TRANSFORMERS: "original (float)"}
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class BenchLLMOptions:
    """``targets``: the files to time; ``original``: the float model they were made from; ``workdir``: where
    the originals written for the run are kept (None: a temporary folder, removed afterwards)."""

    targets: tuple[str, ...]
    original: str | None = None
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    workdir: str | None = None
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not self.targets:
            raise LowbitError("give at least one file to time: a .gguf, an .onnx, or a model folder")


def inspect_bench_target(name: str) -> Target:
    """``inspect_target`` for a path; a built-in model name is its file (the built-in SmolLM2 is a GGUF, run in
    llama.cpp) or folder (run in transformers)."""
    path = Path(name)
    if not path.exists():
        try:
            path = resolve_source(name)
        except LowbitError:
            pass  # inspect_target says what is missing
    target = inspect_target(path)
    if target.engine == ONNXRUNTIME:
        _require_kv_graph(target.path)
    return target


def _require_kv_graph(path: Path) -> None:
    """An ONNX graph must take a past: decode speed is one token per step with the cache."""
    import onnx

    from lowbit.export.onnx_kv import has_kv_cache

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's decode errors have no common public type
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LowbitError(f"{path} is not a readable ONNX file: {first}") from None
    if not has_kv_cache(proto):
        raise LowbitError(f"{path} has no KV cache (no input past_key_values.0.key); decode speed needs one: "
                          "re-export it with 'lowbit export onnx' (causal LMs get a KV-cache graph by default)")


def file_bytes(target: Target) -> int:
    """Bytes on disk of what the engine loads: the file (a .gguf, a model.onnx), or a folder's weight files."""
    path = target.path
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _original_name(opts: BenchLLMOptions, targets: list[Target]) -> str:
    if opts.original:
        return opts.original
    recorded = [t.original for t in targets if t.original]
    return recorded[0] if recorded else DEFAULT_LLM


def prompt_ids(tokenizer: Any, n: int) -> list[int]:
    """The first ``n`` token ids of the default text (no special tokens added)."""
    from lowbit.data.text import default_text

    ids = tokenizer(default_text()[: n * 16], add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        raise LowbitError(f"the default text gives only {len(ids)} tokens; ask for fewer --prompt-tokens")
    return list(ids[:n])


def _check_context(targets: list[Target], model: Any, opts: SpeedOptions) -> None:
    """Prompt and decode steps must fit the shortest context of the targets (and of ``model``, if given)."""
    config = getattr(model, "config", None)
    own = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    contexts = [c for c in [own, *(t.context for t in targets)] if c]
    needed = opts.prompt_tokens + opts.new_tokens + 1
    if contexts and needed > min(contexts):
        raise LowbitError(f"--prompt-tokens {opts.prompt_tokens} + --new-tokens {opts.new_tokens} need a context of "
                          f"{needed} tokens; the model's is {min(contexts)}")


def write_originals(loaded: Any, engines: set[str], workdir: Path, progress: bool) -> dict[str, Target]:
    """The original as each engine needs it: an F16 GGUF (llama.cpp), the fp32 KV-cache graph (onnxruntime),
    the float folder (transformers: the source folder itself, or the loaded model saved as one when the
    source is a GGUF file)."""
    originals: dict[str, Target] = {}
    source = Path(loaded.source)
    if LLAMA_CPP in engines:
        from lowbit.export.gguf import GGUFExportOptions, export_gguf

        out = workdir / "original-F16.gguf"
        _note(progress, f"writing the original as {out.name}")
        export_gguf(GGUFExportOptions(model=str(source), type="F16", out=str(out), method="rtn", force=True),
                    progress=False, loaded=loaded)
        originals[LLAMA_CPP] = inspect_target(out)
    if ONNXRUNTIME in engines:
        from lowbit.export.onnx import OnnxExportOptions, export_onnx

        out = workdir / "original-fp32" / ONNX_FILE
        _note(progress, f"writing the original as {out.parent.name}/{out.name}")
        export_onnx(OnnxExportOptions(model=str(source), mode="float", out=str(out), force=True), loaded=loaded)
        _require_kv_graph(out)
        originals[ONNXRUNTIME] = inspect_target(out)
    if TRANSFORMERS in engines:
        folder = source
        if not source.is_dir():
            from lowbit.io_utils import atomic_directory

            folder = workdir / "original-float"
            _note(progress, f"writing the original as {folder.name}")
            with atomic_directory(folder, force=True) as tmp:
                loaded.model.save_pretrained(str(tmp), safe_serialization=True)
                loaded.tokenizer.save_pretrained(str(tmp))
        originals[TRANSFORMERS] = inspect_target(folder)
    return originals


def _note(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def _label(target: Target) -> str:
    return target.path.parent.name if target.path.name == ONNX_FILE else target.path.name


def _row(label: str, target: Target, speed: Any, original: bool) -> dict[str, Any]:
    return {"label": label, "path": str(target.path), "engine": target.engine, "original": original,
            "bytes": file_bytes(target), **asdict(speed)}


def _with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's figures divided by its engine's original's (size, speeds, time to first token, memory)."""
    base = {r["engine"]: r for r in rows if r["original"]}
    for row in rows:
        ref = base[row["engine"]]
        row["ratios"] = {key: row[key] / ref[key] for key in ("bytes", "prompt_tps", "decode_tps", "ttft_s",
                                                              "peak_rss_bytes")}
    return rows


def bench_llm(opts: BenchLLMOptions, progress: bool = True) -> dict[str, Any]:
    """Time every target and its engine's original; returns the rows (with ratios) and how they were made."""
    from lowbit.model.load import CAUSAL_LM, load_model

    targets = [inspect_bench_target(name) for name in opts.targets]
    original = _original_name(opts, targets)
    _check_context(targets, None, opts.speed)  # before the original is loaded, where the files tell
    loaded = load_model(original)
    if loaded.kind != CAUSAL_LM:
        raise LowbitError(f"{loaded.source} is an encoder; lowbit bench llm times causal language models")
    prompt = prompt_ids(loaded.tokenizer, opts.speed.prompt_tokens)
    _check_context(targets, loaded.model, opts.speed)
    for target in targets:
        check_vocabulary(target, loaded.tokenizer, original)
    engines = [t.engine for t in targets]
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        workdir = Path(opts.workdir) if opts.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        originals = write_originals(loaded, set(engines), workdir, progress)
        del loaded
        gc.collect()  # the parent's copy of the original goes before the timed processes start
        rows = []
        for engine in dict.fromkeys(engines):  # engines in the order the targets name them
            ref = originals[engine]
            jobs = [(ORIGINAL_LABELS[engine], ref, True)]
            jobs += [(_label(t), t, False) for t in targets
                     if t.engine == engine and t.path.resolve() != ref.path.resolve()]
            for label, target, is_original in jobs:
                _note(progress, f"timing {label} in {engine}")
                speed = measure_in_child(engine, target.path, prompt, opts.speed, opts.timeout_s)
                rows.append(_row(label, target, speed, is_original))
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "lowbit_version": __version__,
            "original": original, "options": asdict(opts.speed), "prompt": "pydoc topics (default text)",
            "rows": _with_ratios(rows)}
