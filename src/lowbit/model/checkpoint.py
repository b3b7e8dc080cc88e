"""lowbit's own checkpoint: one safetensors file of packed codes, scales, zero points and float tensors.

For a quantized parameter ``P`` the file holds ``P.qcodes`` (uint8, codes packed densely at the spec's bit
width, row-major), ``P.scales`` (the spec's scale dtype) and, when asymmetric, ``P.qzeros`` (packed like
the codes; fp16 and unpacked for HQQ's float zero points) and, for ``scale=e4m3`` specs (NVFP4),
``P.global_scale`` (fp32, shape (1,)). A linear ``M`` whose input is quantized has its activation spec in
the metadata entry of ``M.weight`` (key ``input``) and, when static, its scale in ``M.input_scale``. Codes of float
and table formats are unsigned bit patterns; signed integer codes are packed with an offset of 2^(b-1).
The header metadata ``lowbit`` (JSON) records the format version and each quantized
parameter's spec and shape. Float parameters are stored under their own names. Next to it: config.json,
the tokenizer files, recipe.yaml, lowbit.json (what the checkpoint was made from) and report.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.formats.activation import ActivationSpec, parse_activation_spec
from lowbit.formats.packing import pack_codes, unpack_codes
from lowbit.formats.qtensor import QTensor
from lowbit.formats.quantize import dequantize
from lowbit.formats.spec import parse_spec
from lowbit.model.act_quant import InputQuantizer, attach_input_quantizer, input_quantizers
from lowbit.model.apply import QuantizedModel
from lowbit.model.conv1d import linearize_conv1d
from lowbit.model.load import CAUSAL_LM, validate_safetensors

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "lowbit.json"


def write_checkpoint(qm: QuantizedModel, out_dir: Path, config: Any, tokenizer: Any, manifest: dict) -> None:
    """Write the weights, config, tokenizer and manifest of a quantized model into ``out_dir``."""
    tensors, entries = encode_quantized(qm.qtensors, input_quantizers(qm.model))
    for name, t in qm.float_tensors.items():
        tensors[name] = t.contiguous()
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata=weights_metadata(entries))
    config.to_json_file(str(out_dir / "config.json"))
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def encode_quantized(qtensors: dict[str, QTensor],
                     quantizers: dict[str, InputQuantizer]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata entries) of QTensors and input quantizers, as the weights file stores them.

    ``quantizers`` maps a linear's name to its input quantizer. Shared with the per-block calibration state
    (``lowbit.pipeline.resume``), so there is one way to store a QTensor.
    """
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name, qt in qtensors.items():
        tensors[f"{name}.qcodes"] = pack_codes(qt.codes, qt.spec.bits, signed=qt.spec.codes_signed)
        tensors[f"{name}.scales"] = qt.scales.contiguous()
        if qt.zeros is not None and qt.zeros.is_floating_point():  # HQQ's float zero points
            tensors[f"{name}.qzeros"] = qt.zeros.contiguous()
        elif qt.zeros is not None:
            tensors[f"{name}.qzeros"] = pack_codes(qt.zeros, qt.spec.bits, signed=False)
        if qt.global_scale is not None:
            tensors[f"{name}.global_scale"] = qt.global_scale.to(torch.float32).reshape(1).contiguous()
        entries[name] = {"spec": str(qt.spec), "shape": list(qt.shape), "matrix_shape": list(qt.codes.shape)}
    for module_name, quantizer in quantizers.items():
        entries[f"{module_name}.weight"]["input"] = str(quantizer.spec)
        if quantizer.scale is not None:
            tensors[f"{module_name}.input_scale"] = quantizer.scale.reshape(1).float().contiguous()
    return tensors, entries


def weights_metadata(entries: dict) -> dict[str, str]:
    """The safetensors header metadata of a lowbit weights file: format version and each QTensor's entry.

    No dates or timings: two runs with the same inputs write the same bytes.
    """
    meta = {"format_version": FORMAT_VERSION, "lowbit_version": __version__, "quantized": entries}
    return {"lowbit": json.dumps(meta)}


def read_header(path: Path) -> tuple[dict, dict]:
    """(tensor table, lowbit metadata) of a checkpoint's weights file, without reading tensor data."""
    validate_safetensors(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", {}) or {}
    if "lowbit" not in meta:
        return header, {}
    return header, json.loads(meta["lowbit"])


def read_qtensors(path: Path) -> tuple[dict[str, QTensor], dict[str, torch.Tensor]]:
    """All QTensors and float tensors stored in a lowbit weights file."""
    _, meta = read_header(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise LowbitError(f"{path} is not a lowbit checkpoint of format version {FORMAT_VERSION}")
    entries = meta["quantized"]
    qtensors: dict[str, QTensor] = {}
    floats: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for name, entry in entries.items():
            spec = parse_spec(entry["spec"])
            rows, cols = entry["matrix_shape"]
            codes = unpack_codes(f.get_tensor(f"{name}.qcodes"), spec.bits, signed=spec.codes_signed, count=rows * cols)
            scales = f.get_tensor(f"{name}.scales")
            zeros = None
            if not spec.symmetric:
                zeros = f.get_tensor(f"{name}.qzeros")
                if not zeros.is_floating_point():
                    zeros = unpack_codes(zeros, spec.bits, signed=False, count=scales.numel()).reshape(scales.shape)
            gkey = f"{name}.global_scale"
            global_scale = f.get_tensor(gkey) if gkey in keys else None
            qtensors[name] = QTensor(codes.reshape(rows, cols), scales, zeros, spec, tuple(entry["shape"]), global_scale)
        owned = {f"{n}.{part}" for n in entries for part in ("qcodes", "scales", "qzeros", "global_scale")}
        owned |= {f"{n.removesuffix('.weight')}.input_scale" for n in entries}
        for key in sorted(keys - owned):
            floats[key] = f.get_tensor(key)
    return qtensors, floats


def read_manifest(out_dir: Path) -> dict:
    """The manifest (source model, kind, scheme) of a checkpoint folder."""
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        raise LowbitError(f"{out_dir} is not a lowbit output folder (no {MANIFEST_FILE})")
    return json.loads(path.read_text())


def load_checkpoint(out_dir: str | Path) -> tuple[nn.Module, Any, dict]:
    """Rebuild the fake-quant float32 model, tokenizer and manifest from a lowbit output folder."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    qtensors, floats = read_qtensors(out_dir / WEIGHTS_FILE)
    config = AutoConfig.from_pretrained(str(out_dir))
    auto = AutoModelForCausalLM if manifest.get("kind") == CAUSAL_LM else AutoModel
    model = auto.from_config(config, dtype=torch.float32)
    linearize_conv1d(model)  # checkpoints hold Conv1D projections in the linear layout they were quantized in
    state = {name: t.float() for name, t in floats.items()}
    state.update({name: dequantize(qt) for name, qt in qtensors.items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = _not_tied(model, missing, set(state))
    if unexpected or missing:
        raise LowbitError(f"{out_dir} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for module_name, (spec, scale) in read_input_quantizers(out_dir / WEIGHTS_FILE).items():
        attach_input_quantizer(model.get_submodule(module_name), spec, scale)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    return model, tokenizer, manifest


def read_input_quantizers(path: Path) -> dict[str, tuple[ActivationSpec, torch.Tensor | None]]:
    """Activation spec and static scale (or None) of every linear whose input is quantized."""
    _, meta = read_header(path)
    out = {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for name, entry in meta.get("quantized", {}).items():
            if "input" in entry:
                module = name.removesuffix(".weight")
                key = f"{module}.input_scale"
                out[module] = (parse_activation_spec(entry["input"]), f.get_tensor(key)[0] if key in keys else None)
    return out


def _not_tied(model: nn.Module, missing: list[str], loaded: set[str]) -> list[str]:
    """The missing names that are not filled through a tied alias (e.g. lm_head tied to the embeddings)."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    filled = {n for names in aliases.values() if loaded.intersection(names) for n in names}
    return sorted(set(missing) - filled)
