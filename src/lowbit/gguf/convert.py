"""From a float transformers model to GGUF tensor bytes: llama.cpp names and layouts (``lowbit.gguf.arch``),
each tensor's block type from the named mix (``lowbit.gguf.mixes``), calibration statistics (importance matrix,
Hessians) when the method needs them, and the encoded tensors (``lowbit.gguf.blocks`` / ``feedback``).
The file itself is written by ``lowbit.export.gguf``, which never quantizes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowbit.data.text import calibration_windows, load_text, tokenize
from lowbit.errors import LowbitError
from lowbit.gguf.arch import Architecture, HParams, get_architecture, layer_of
from lowbit.gguf.blocks import ROW_SLICE_ELEMENTS, get_block_type
from lowbit.gguf.calibrate import Calibration, collect
from lowbit.gguf.imatrix import check_imatrix, read_imatrix, write_imatrix
from lowbit.gguf.mixes import FLOAT_TYPES, Choice, Mix, TensorRole, choose_type, is_quantizable
from lowbit.model.conv1d import linearize_conv1d
from lowbit.model.load import LoadedModel

METHODS = ("rtn", "imatrix", "gptq")


@dataclass(frozen=True)
class GGUFExportOptions:
    """Everything ``lowbit export gguf`` takes.

    method: ``rtn`` = llama.cpp's reference rounding (no calibration); ``imatrix`` = importance-weighted scale
    search; ``gptq`` = importance-weighted search plus error feedback. ``imatrix``: a llama.cpp imatrix.dat
    to read (if it exists) or to write (if not). Calibration windows come after the evaluation tokens.
    ``type`` is the base mix (and the file's ``general.file_type``); ``types`` an explicit plan, pairs of
    (GGUF tensor name, block type) such as ``(("blk.0.ffn_down.weight", "Q6_K"),)``, that override the mix's
    choice for the tensors they name (checked by ``lowbit.gguf.plan.checked_types`` before any calibration).
    """

    model: str | None = None
    type: str = "Q4_K_M"
    types: tuple[tuple[str, str], ...] = ()
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


# State-dict entries llama.cpp does not store: rotary caches and GPT-2's causal-mask buffers.
_NOT_STORED = re.compile(r"(rotary|inv_freq|\.attn\.bias$|\.attn\.masked_bias$)")


def stored_tensors(model: torch.nn.Module, arch: Architecture, hp: HParams) -> list[tuple[str, str, torch.Tensor]]:
    """(GGUF name, state-dict name, tensor) of every entry llama.cpp stores, in file order, without copying or
    re-laying out anything (tied output dropped, rotary caches skipped)."""
    out, seen, storages = [], set(), set()
    linearize_conv1d(model)  # a model not loaded through load_model may still hold [in, out] Conv1D weights
    for hf_name, tensor in model.state_dict().items():
        alias = (tensor.data_ptr(), tuple(tensor.shape))
        if alias in storages:  # a tied weight (lm_head sharing the embedding) is stored once
            continue
        storages.add(alias)
        name = arch.tensor_name(hf_name, hp.n_layers)
        if name is None:
            if _NOT_STORED.search(hf_name):
                continue
            raise LowbitError(f"the GGUF exporter does not know where {hf_name} goes in a {arch.name} model")
        if name == "output.weight" and hp.tied_embeddings or name in seen:
            continue
        seen.add(name)
        out.append((name, hf_name, tensor))
    return out


def source_module(hf_name: str, tensor: torch.Tensor) -> str | None:
    """The module a 2-D weight belongs to (``model.layers.0.mlp.down_proj``); None for 1-D tensors."""
    return hf_name.rsplit(".", 1)[0] if tensor.dim() == 2 else None


def gguf_tensors(model: torch.nn.Module, arch: Architecture, hp: HParams) -> list[FloatTensor]:
    """The model's weights renamed and laid out for llama.cpp ([out, in] rows, tied output dropped, the
    architecture's re-layouts applied)."""
    out = []
    for name, hf_name, tensor in stored_tensors(model, arch, hp):
        data = arch.transform(name, tensor.detach().float().cpu().numpy(), hp)
        out.append(FloatTensor(name, np.ascontiguousarray(data, dtype=np.float32), source_module(hf_name, tensor)))
    return out


def plan_types(mix: Mix, tensors: list[FloatTensor], hp: HParams) -> dict[str, Choice]:
    """Each tensor's block type under ``mix`` (llama.cpp's choices and fallbacks)."""
    return plan_shapes(mix, {t.name: t.data.shape for t in tensors}, hp)


def plan_shapes(mix: Mix, shapes: dict[str, tuple[int, ...]], hp: HParams) -> dict[str, Choice]:
    """``plan_types`` from tensor shapes alone (name -> (rows, ne0)), for planning without the weights."""
    return {name: choose_type(mix, TensorRole(name, shape[-1], len(shape), layer_of(name), hp.n_layers, hp.n_gqa,
                                              hp.tied_embeddings)) for name, shape in shapes.items()}


def calibration_targets(tensors: list[FloatTensor], hp: HParams, plan: dict[str, Choice]) -> dict[str, str]:
    """Linear module name -> GGUF name for every quantized tensor that multiplies activations."""
    targets = {t.module: t.name for t in tensors if t.module and plan[t.name].type not in FLOAT_TYPES
               and t.name != "token_embd.weight"}
    if hp.tied_embeddings and plan.get("token_embd.weight", Choice("F32", "F32")).type not in FLOAT_TYPES:
        targets["lm_head"] = "token_embd.weight"
    return targets


def statistics(opts: GGUFExportOptions, loaded: LoadedModel, targets: dict[str, str], columns: dict[str, int],
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
    """Calibration targets covering every tensor any mix or explicit plan may quantize (to calibrate once for
    many exports): every quantizable tensor whose rows fit the smallest block (32 values)."""
    arch = get_architecture(loaded.model)
    hp = arch.hparams(loaded.model.config)
    tensors = gguf_tensors(loaded.model, arch, hp)
    plan = {t.name: Choice("Q8_0", "Q8_0") if is_quantizable(t.name, t.data.ndim) and t.data.shape[-1] % 32 == 0
            else Choice("F32", "F32") for t in tensors}
    return calibration_targets(tensors, hp, plan)


def encode_tensor(t: FloatTensor, choice: Choice, method: str, imatrix: dict | None, hessians: dict | None,
                  damp: float) -> np.ndarray:
    """The tensor's bytes (or float array) in its chosen type, by the chosen method."""
    block = get_block_type(choice.type)
    if choice.type in FLOAT_TYPES or t.data.ndim < 2:
        data = block.quantize(t.data.reshape(1, -1) if t.data.ndim < 2 else t.data)
        return data.reshape(t.data.shape) if t.data.ndim < 2 else data
    imp = imatrix.get(t.name) if imatrix else None
    h = hessians.get(t.name) if hessians else None
    if method == "gptq" and block.feedback and h is not None:
        # rows are independent given H: slices of rows bound the float64 temporaries of a 262k-row embedding
        step = max(1, ROW_SLICE_ELEMENTS // t.data.shape[1])
        return np.concatenate([block.quantize_with_feedback(t.data[i:i + step], h, imp, damp)
                               for i in range(0, t.data.shape[0], step)])
    return block.quantize(t.data, imp)
