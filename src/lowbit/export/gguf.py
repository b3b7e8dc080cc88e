"""Write a float causal LM as a GGUF v3 file that stock llama.cpp loads.

Steps: name and lay out the weights the way llama.cpp expects (``lowbit.gguf.arch``), pick each tensor's
block type from the named mix (``lowbit.gguf.mixes``), optionally calibrate (importance matrix, Hessians),
encode every tensor (``lowbit.gguf.blocks`` / ``feedback``), and write header, metadata and aligned tensor
data with the gguf package's writer into a temporary file that becomes the output only when complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit import __version__
from lowbit.data.text import calibration_windows, load_text, tokenize
from lowbit.errors import LowbitError
from lowbit.gguf.arch import Architecture, HParams, get_architecture, layer_of
from lowbit.gguf.blocks import get_block_type
from lowbit.gguf.calibrate import Calibration, collect
from lowbit.gguf.feedback import feedback_quantize
from lowbit.gguf.imatrix import check_imatrix, read_imatrix, write_imatrix
from lowbit.gguf.mixes import FLOAT_TYPES, Choice, Mix, TensorRole, choose_type, get_mix
from lowbit.gguf.tokenizer import tokenizer_metadata
from lowbit.io_utils import atomic_file
from lowbit.model.load import CAUSAL_LM, LoadedModel, load_model

METHODS = ("rtn", "imatrix", "gptq")


@dataclass(frozen=True)
class GGUFExportOptions:
    """Everything ``lowbit export gguf`` takes.

    method: ``rtn`` = llama.cpp's reference rounding (no calibration); ``imatrix`` = importance-weighted scale
    search; ``gptq`` = importance-weighted search plus error feedback. ``imatrix``: a llama.cpp imatrix.dat
    to read (if it exists) or to write (if not). Calibration windows come after the evaluation tokens.
    """

    model: str | None = None
    type: str = "Q4_K_M"
    out: str | None = None
    method: str = "gptq"
    imatrix: str | None = None
    calib_text: str | None = None
    calib_samples: int = 32
    calib_length: int = 512
    eval_tokens: int = 8 * 512
    damp: float = 0.01
    force: bool = False


@dataclass(frozen=True)
class FloatTensor:
    """One tensor as llama.cpp stores it: GGUF name, float32 data (rows = ne1.., row = ne0), source module."""

    name: str
    data: np.ndarray
    module: str | None


def gguf_tensors(model: torch.nn.Module, arch: Architecture, hp: HParams) -> list[FloatTensor]:
    """The model's weights renamed and laid out for llama.cpp (tied output dropped, Q/K permuted)."""
    out, seen = [], set()
    for hf_name, tensor in model.state_dict().items():
        name = arch.tensor_name(hf_name, hp.n_layers)
        if name is None:
            if "rotary" in hf_name:
                continue
            raise LowbitError(f"the GGUF exporter does not know where {hf_name} goes in a {arch.name} model")
        if name == "output.weight" and hp.tied_embeddings or name in seen:
            continue
        seen.add(name)
        data = arch.transform(name, tensor.detach().float().cpu().numpy(), hp)
        module = hf_name.rsplit(".", 1)[0] if tensor.dim() == 2 else None
        out.append(FloatTensor(name, np.ascontiguousarray(data), module))
    return out


def plan_types(mix: Mix, tensors: list[FloatTensor], hp: HParams) -> dict[str, Choice]:
    """Each tensor's block type under ``mix`` (llama.cpp's choices and fallbacks)."""
    return {t.name: choose_type(mix, TensorRole(t.name, t.data.shape[-1], t.data.ndim, layer_of(t.name),
                                                hp.n_layers, hp.n_gqa, hp.tied_embeddings)) for t in tensors}


def _calibration_targets(tensors: list[FloatTensor], hp: HParams, plan: dict[str, Choice]) -> dict[str, str]:
    """Linear module name -> GGUF name for every quantized tensor that multiplies activations."""
    targets = {t.module: t.name for t in tensors if t.module and plan[t.name].type not in FLOAT_TYPES
               and t.name != "token_embd.weight"}
    if hp.tied_embeddings and plan.get("token_embd.weight", Choice("F32", "F32")).type not in FLOAT_TYPES:
        targets["lm_head"] = "token_embd.weight"
    return targets


def _statistics(opts: GGUFExportOptions, loaded: LoadedModel, targets: dict[str, str], columns: dict[str, int],
                progress: bool, calib: Calibration | None) -> tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray] | None]:
    """(importance matrix, Hessians) the method needs, reading or writing ``opts.imatrix`` as asked."""
    if opts.method == "rtn":
        return None, None
    from_file = read_imatrix(opts.imatrix) if opts.imatrix and Path(opts.imatrix).exists() else None
    if from_file is not None:
        check_imatrix(from_file, columns, opts.imatrix)
    if from_file is not None and opts.method == "imatrix":
        return from_file, None
    calib = calib or calibrate(opts, loaded, targets, progress)
    imatrix = from_file or calib.imatrix()
    if opts.imatrix and from_file is None:
        write_imatrix(opts.imatrix, imatrix, calib.n_chunks, opts.calib_text or "pydoc_data.topics")
    return imatrix, (calib.hessians if opts.method == "gptq" else None)


def calibrate(opts: GGUFExportOptions, loaded: LoadedModel, targets: dict[str, str], progress: bool) -> Calibration:
    """Hessians of every target's inputs on calibration windows drawn after the evaluation tokens."""
    ids = tokenize(loaded.tokenizer, load_text(opts.calib_text))
    windows = calibration_windows(ids, opts.calib_samples, opts.calib_length, opts.eval_tokens).ids
    return collect(loaded.model, targets, windows, progress)


def all_targets(loaded: LoadedModel) -> dict[str, str]:
    """Calibration targets covering every tensor any mix may quantize (to calibrate once for many exports)."""
    arch = get_architecture(loaded.model)
    hp = arch.hparams(loaded.model.config)
    tensors = gguf_tensors(loaded.model, arch, hp)
    return _calibration_targets(tensors, hp, plan_types(get_mix("Q8_0"), tensors, hp))


def encode_tensor(t: FloatTensor, choice: Choice, method: str, imatrix: dict | None, hessians: dict | None,
                  damp: float) -> np.ndarray:
    """The tensor's bytes (or float array) in its chosen type, by the chosen method."""
    block = get_block_type(choice.type)
    if choice.type in FLOAT_TYPES or t.data.ndim < 2:
        data = block.quantize(t.data.reshape(1, -1) if t.data.ndim < 2 else t.data)
        return data.reshape(t.data.shape) if t.data.ndim < 2 else data
    imp = imatrix.get(t.name) if imatrix else None
    h = hessians.get(t.name) if hessians else None
    if method == "gptq" and block.affine and h is not None:
        return feedback_quantize(t.data, h, block, imp, damp=damp)
    return block.quantize(t.data, imp)


def _write(path: Path, arch: Architecture, hp: HParams, mix: Mix, name: str, meta: list, encoded: list,
           plan: dict[str, Choice], method: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=arch.name)
    writer.add_name(name)
    writer.add_type("model")
    for key, vtype, value in arch.keys(arch.name, hp):
        writer.add_key_value(key, value, gguf.GGUFValueType[vtype])
    for key, vtype, value, sub in meta:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    writer.add_file_type(mix.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_custom_alignment(gguf.GGUF_DEFAULT_ALIGNMENT)
    writer.add_quantized_by(f"lowbit {__version__} ({method})")
    fallbacks = [f"{n}:{c.wanted}->{c.type}" for n, c in plan.items() if c.fell_back]
    writer.add_array("lowbit.fallbacks", fallbacks or ["none"])
    for tname, data in encoded:
        writer.add_tensor(tname, data, raw_dtype=gguf.GGMLQuantizationType[plan[tname].type])
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def default_out(opts: GGUFExportOptions, mix: Mix) -> Path:
    model = Path(opts.model).stem if opts.model else "smollm2"
    return Path("out") / f"{model.lower()}-{mix.name}-{opts.method}.gguf"


def export_gguf(opts: GGUFExportOptions, progress: bool = True, loaded: LoadedModel | None = None,
                calibration: Calibration | None = None) -> dict[str, Any]:
    """Quantize and write one GGUF file; returns a summary (path, bytes, types, fallbacks, seconds).
    ``loaded`` and ``calibration`` let a caller that writes many files load and calibrate once."""
    t0 = time.perf_counter()
    mix = get_mix(opts.type)
    if opts.method not in METHODS:
        raise LowbitError(f"unknown GGUF method {opts.method!r}; choose one of {', '.join(METHODS)}")
    out = Path(opts.out) if opts.out else default_out(opts, mix)
    if out.exists() and not opts.force:
        raise LowbitError(f"output {out} already exists; choose another --out or pass --force to replace it")
    loaded = loaded or load_model(opts.model)
    arch = get_architecture(loaded.model)
    if loaded.kind != CAUSAL_LM:
        raise LowbitError(f"GGUF export needs a causal language model; {loaded.source} is an encoder")
    hp = arch.hparams(loaded.model.config)
    meta = tokenizer_metadata(Path(loaded.source), loaded.tokenizer)
    tensors = gguf_tensors(loaded.model, arch, hp)
    plan = plan_types(mix, tensors, hp)
    columns = {t.name: t.data.shape[-1] for t in tensors if t.data.ndim == 2 and plan[t.name].type not in FLOAT_TYPES}
    targets = _calibration_targets(tensors, hp, plan)
    t1 = time.perf_counter()
    imatrix, hessians = _statistics(opts, loaded, targets, columns, progress, calibration)
    t2 = time.perf_counter()
    encoded = [(t.name, encode_tensor(t, plan[t.name], opts.method, imatrix, hessians, opts.damp)) for t in tensors]
    t3 = time.perf_counter()
    with atomic_file(out, force=opts.force) as tmp:
        _write(tmp, arch, hp, mix, Path(loaded.source).stem, meta, encoded, plan, opts.method)
    types: dict[str, int] = {}
    for choice in plan.values():
        types[choice.type] = types.get(choice.type, 0) + 1
    return {"path": str(out), "type": mix.name, "method": opts.method, "bytes": out.stat().st_size,
            "tensor_types": types, "fallbacks": {n: f"{c.wanted}->{c.type}" for n, c in plan.items() if c.fell_back},
            "seconds": {"load": t1 - t0, "calibrate": t2 - t1, "quantize": t3 - t2,
                        "total": time.perf_counter() - t0}}
