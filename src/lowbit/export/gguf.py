"""Write a float causal LM of any family with GGUF rules (``lowbit.gguf.arch``) as a GGUF v3 file that stock
llama.cpp loads.

The job: load the model, let ``lowbit.gguf.convert`` name, plan, calibrate and encode its tensors, then write
header, metadata (hyper-parameters, tokenizer, file type, fallbacks) and aligned tensor data with the gguf
package's writer into a temporary file that becomes the output only when complete.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.gguf.arch import Architecture, HParams, get_architecture
from lowbit.gguf.calibrate import Calibration
from lowbit.gguf.convert import (FLOAT_TYPES, METHODS, GGUFExportOptions, all_targets, calibrate,
                                 calibration_targets, encode_tensor, gguf_tensors, statistics)
from lowbit.gguf.mixes import NEED_IMATRIX, Choice, Mix, get_mix
from lowbit.gguf.plan import planned_tensors, resolve_plan, tensor_bytes
from lowbit.gguf.tokenizer import tokenizer_metadata
from lowbit.io_utils import atomic_file
from lowbit.model.finite import check_parameters
from lowbit.model.load import CAUSAL_LM, LoadedModel, load_model

__all__ = ["METHODS", "GGUFExportOptions", "all_targets", "calibrate", "default_out", "export_gguf",
           "overhead_bytes"]


def _writer(arch: Architecture, hp: HParams, mix: Mix, name: str, meta: list, plan: dict[str, Choice],
            method: str) -> Any:
    """A gguf writer holding the file's metadata (hyper-parameters, tokenizer, file type, fallbacks), no tensors."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=arch.name)
    writer.add_name(name)
    writer.add_type("model")
    for key, vtype, value, sub in arch.metadata(hp) + meta:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    writer.add_file_type(mix.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_custom_alignment(gguf.GGUF_DEFAULT_ALIGNMENT)
    writer.add_quantized_by(f"lowbit {__version__} ({method})")
    fallbacks = [f"{n}:{c.wanted}->{c.type}" for n, c in plan.items() if c.fell_back]
    writer.add_array("lowbit.fallbacks", fallbacks or ["none"])
    return writer


def _write(path: Path, arch: Architecture, hp: HParams, mix: Mix, name: str, meta: list, encoded: list,
           plan: dict[str, Choice], method: str) -> None:
    import gguf

    writer = _writer(arch, hp, mix, name, meta, plan, method)
    for tname, data in encoded:
        writer.add_tensor(tname, data, raw_dtype=gguf.GGMLQuantizationType[plan[tname].type])
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def overhead_bytes(opts: GGUFExportOptions, loaded: LoadedModel | None = None) -> int:
    """Bytes of the file ``export_gguf(opts)`` writes that are not data of quantizable tensors (2-D weights
    other than norms): header, metadata (tokenizer included), tensor infos, alignment padding, and the F32
    norms/biases. ``overhead_bytes(opts) + sum(tensor_bytes(type, shape))`` over the quantizable tensors of
    ``planned_tensors(loaded, opts.type, opts.types)`` is the file's exact size. Another plan changes it only
    by alignment padding (under 32 bytes per tensor) and by the ``lowbit.fallbacks`` entries of tensors the
    plan leaves to the mix; nothing is quantized and nothing is written except a temporary header."""
    import gguf

    loaded = loaded or load_model(opts.model)
    mix = file_mix(opts)
    arch = get_architecture(loaded.model)
    hp = arch.hparams(loaded.model.config)
    planned = planned_tensors(loaded, mix, opts.types)
    plan = {p.name: p.choice for p in planned}
    writer = _writer(arch, hp, mix, Path(loaded.source).stem, tokenizer_metadata(Path(loaded.source),
                     loaded.tokenizer, hp.vocab_size), plan, opts.method)
    padded, align = 0, gguf.GGUF_DEFAULT_ALIGNMENT
    for p in planned:
        nbytes = tensor_bytes(p.choice.type, p.shape)
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), nbytes,
                               raw_dtype=gguf.GGMLQuantizationType[p.choice.type])
        padded += gguf.GGUFWriter.ggml_pad(nbytes, align) - (nbytes if p.quantizable else 0)
    with tempfile.TemporaryDirectory() as tmp:  # the writer measures what it writes: header, KV, tensor infos
        writer.write_header_to_file(path=Path(tmp) / "header.gguf")
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        head = (Path(tmp) / "header.gguf").stat().st_size
    return gguf.GGUFWriter.ggml_pad(head, align) + padded


def file_mix(opts: GGUFExportOptions) -> Mix:
    """The mix ``opts.type`` names, choosing per tensor as llama-quantize does with an importance matrix when the
    method calibrates (imatrix, gptq) and without one for ``rtn``."""
    return get_mix(opts.type, imatrix=opts.method != "rtn")


def _check_importance(plan: dict[str, Choice], method: str) -> None:
    """llama-quantize refuses the lowest-bit i-quants without an importance matrix; so does ``--method rtn``."""
    needy = sorted({c.type for c in plan.values() if c.type in NEED_IMATRIX})
    if method == "rtn" and needy:
        raise LowbitError(f"{', '.join(needy)} need an importance matrix (llama.cpp calls them garbage without one): "
                          "use --method imatrix (calibrates on --calib-text) or --method gptq")


def default_out(opts: GGUFExportOptions, mix: Mix) -> Path:
    model = Path(opts.model).stem if opts.model else "smollm2"
    return Path("out") / f"{model.lower()}-{mix.name}-{opts.method}.gguf"


def export_gguf(opts: GGUFExportOptions, progress: bool = True, loaded: LoadedModel | None = None,
                calibration: Calibration | None = None) -> dict[str, Any]:
    """Quantize and write one GGUF file; returns a summary (path, bytes, type counts, each tensor's type,
    fallbacks, seconds). ``opts.types`` overrides the mix per tensor (checked before any calibration or
    quantization). ``loaded`` and ``calibration`` let a caller that writes many files load and calibrate once."""
    t0 = time.perf_counter()
    mix = file_mix(opts)
    if opts.method not in METHODS:
        raise LowbitError(f"unknown GGUF method {opts.method!r}; choose one of {', '.join(METHODS)}")
    if opts.method == "rtn" and opts.imatrix:
        raise LowbitError("--imatrix needs --method imatrix or gptq (rtn is llama.cpp's unweighted rounding)")
    if opts.method != "rtn" and (opts.calib_samples <= 0 or opts.calib_length < 2):
        raise LowbitError("--calib-samples must be positive")
    out = Path(opts.out) if opts.out else default_out(opts, mix)
    if out.exists() and not opts.force:
        raise LowbitError(f"output {out} already exists; choose another --out or pass --force to replace it")
    loaded = loaded or load_model(opts.model)
    check_parameters(loaded.model, fp16_matrices=True)  # NaN/Inf (or fp16-overflowing) weights never get encoded
    if loaded.kind != CAUSAL_LM:
        raise LowbitError(f"GGUF export needs a causal language model; {loaded.source} is an encoder")
    arch = get_architecture(loaded.model)
    hp = arch.hparams(loaded.model.config)
    meta = tokenizer_metadata(Path(loaded.source), loaded.tokenizer, hp.vocab_size)
    tensors = gguf_tensors(loaded.model, arch, hp)
    plan = resolve_plan(mix, {t.name: t.data.shape for t in tensors}, hp, opts.types)
    _check_importance(plan, opts.method)
    columns = {t.name: t.data.shape[-1] for t in tensors if t.data.ndim == 2 and plan[t.name].type not in FLOAT_TYPES}
    targets = calibration_targets(tensors, hp, plan)
    t1 = time.perf_counter()
    imatrix, hessians = statistics(opts, loaded, targets, columns, progress, calibration)
    t2 = time.perf_counter()
    encoded = [(t.name, encode_tensor(t, plan[t.name], opts.method, imatrix, hessians, opts.damp)) for t in tensors]
    t3 = time.perf_counter()
    with atomic_file(out, force=opts.force) as tmp:
        _write(tmp, arch, hp, mix, Path(loaded.source).stem, meta, encoded, plan, opts.method)
    types: dict[str, int] = {}
    for choice in plan.values():
        types[choice.type] = types.get(choice.type, 0) + 1
    return {"path": str(out), "type": mix.name, "method": opts.method, "bytes": out.stat().st_size,
            "tensor_types": types, "per_tensor_types": {n: c.type for n, c in plan.items()},
            "explicit": len(dict(opts.types)),
            "fallbacks": {n: f"{c.wanted}->{c.type}" for n, c in plan.items() if c.fell_back},
            "seconds": {"load": t1 - t0, "calibrate": t2 - t1, "quantize": t3 - t2,
                        "total": time.perf_counter() - t0}}


def is_lowbit_checkpoint(path: str | Path | None) -> bool:
    """Whether ``path`` is a lowbit output folder (``lowbit quantize`` / ``lowbit qat``)."""
    return path is not None and Path(path).is_dir() and (Path(path) / "lowbit.json").is_file()


def export_gguf_checkpoint(folder: str | Path, opts: GGUFExportOptions, progress: bool = True) -> dict[str, Any]:
    """Write a lowbit checkpoint as GGUF without re-quantizing its quantized tensors.

    Each tensor gets the type the mix ``opts.type`` (or ``opts.types``) plans for it. A tensor the checkpoint
    holds quantized must already be on that type's grid (``lowbit.gguf.twins``: TQ2_0/TQ1_0, Q4_0, Q8_0): its
    codes and scales are laid out as llama.cpp's blocks and checked to decode to the checkpoint's values
    bit for bit; any other type is refused, naming the spec that would fit. Tensors the checkpoint keeps in
    float (embeddings, norms, layers left out) are encoded as llama.cpp's own quantizer does (``rtn``)."""
    from lowbit.gguf.twins import check_exact, encode_twin, twin_spec
    from lowbit.model.checkpoint import WEIGHTS_FILE, load_checkpoint, read_qtensors

    t0 = time.perf_counter()
    folder = Path(folder)
    mix = get_mix(opts.type)
    out = Path(opts.out) if opts.out else folder.with_name(f"{folder.name}-{mix.name}.gguf")
    if out.exists() and not opts.force:
        raise LowbitError(f"output {out} already exists; choose another --out or pass --force to replace it")
    model, tokenizer, manifest = load_checkpoint(folder)
    if manifest.get("kind") != CAUSAL_LM:
        raise LowbitError(f"GGUF export needs a causal language model; {folder} holds an encoder")
    qtensors, _ = read_qtensors(folder / WEIGHTS_FILE)
    arch = get_architecture(model)
    hp = arch.hparams(model.config)
    source = Path(manifest.get("source", ""))
    if not source.exists():
        raise LowbitError(f"{folder}: the original model {source} (for the tokenizer metadata) is not there")
    meta = tokenizer_metadata(source, tokenizer, hp.vocab_size)
    tensors = gguf_tensors(model, arch, hp)
    plan = resolve_plan(mix, {t.name: t.data.shape for t in tensors}, hp, opts.types)
    encoded, exact = [], 0
    for t in tensors:
        choice = plan[t.name]
        qt = qtensors.get(f"{t.module}.weight") if t.module else None
        if qt is None or choice.type in FLOAT_TYPES:
            encoded.append((t.name, encode_tensor(t, choice, "rtn", None, None, opts.damp)))
            continue
        if twin_spec(choice.type) is None:
            raise LowbitError(f"{t.name} is quantized in the checkpoint ({qt.spec}) but {mix.name} plans "
                              f"{choice.type} for it, which is not a grid lowbit trains on; choose a mix of TQ2_0, "
                              "TQ1_0, Q4_0 or Q8_0, or export the original model")

        def layout(a: np.ndarray, name: str = t.name) -> np.ndarray:
            return np.ascontiguousarray(arch.transform(name, a, hp), dtype=np.float32)

        data = encode_twin(qt, choice.type, layout)
        check_exact(qt, choice.type, data, layout)
        encoded.append((t.name, data))
        exact += 1
    with atomic_file(out, force=opts.force) as tmp:
        _write(tmp, arch, hp, mix, folder.name, meta, encoded, plan, "lowbit checkpoint")
    types: dict[str, int] = {}
    for choice in plan.values():
        types[choice.type] = types.get(choice.type, 0) + 1
    return {"path": str(out), "type": mix.name, "method": "checkpoint", "bytes": out.stat().st_size,
            "tensor_types": types, "per_tensor_types": {n: c.type for n, c in plan.items()}, "explicit": 0,
            "exact_from_codes": exact,
            "fallbacks": {n: f"{c.wanted}->{c.type}" for n, c in plan.items() if c.fell_back},
            "seconds": {"total": time.perf_counter() - t0}}
