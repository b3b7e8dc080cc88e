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

A streamed run (``lowbit quantize --stream``) writes its weights block by block (``CheckpointShards``) as
Hugging Face shards, ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``
(``lowbit.model.shards``), when they do not fit one shard. Each shard holds whole blocks and its own ``lowbit``
metadata for the QTensors in it; the readers here take ``<folder>/model.safetensors`` (or the folder) and read
every shard when the folder is sharded, so callers do not care which layout they got.
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
from lowbit.model.shards import INDEX_FILE, ShardWriter, read_weight_map

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "lowbit.json"
# A streamed run's shard limit: small enough that the shard being filled is a small part of its memory, large
# enough that even a 70B model's output is tens of files, not hundreds.
DEFAULT_SHARD_BYTES = 500 * 10**6


def write_checkpoint(qm: QuantizedModel, out_dir: Path, config: Any, tokenizer: Any, manifest: dict) -> None:
    """Write the weights, config, tokenizer and manifest of a quantized model into ``out_dir``."""
    tensors, entries = encode_quantized(qm.qtensors, input_quantizers(qm.model))
    for name, t in qm.float_tensors.items():
        tensors[name] = t.contiguous()
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata=weights_metadata(entries))
    write_companions(out_dir, config, tokenizer, manifest)


def write_companions(out_dir: Path, config: Any, tokenizer: Any, manifest: dict) -> None:
    """Everything of a checkpoint folder but the weights: config.json, the tokenizer files and lowbit.json."""
    config.to_json_file(str(out_dir / "config.json"))
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


class CheckpointShards:
    """lowbit's weights written group by group (a streamed run's finished blocks) into ``out_dir``, in shards of
    at most ``max_shard_bytes`` (``lowbit.model.shards.ShardWriter``): each group's QTensors are packed when
    added, so the caller can drop them. Stored exactly as ``write_checkpoint`` stores them; one shard is the
    same ``model.safetensors``."""

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.writer = ShardWriter(out_dir, max_shard_bytes, weights_metadata)

    def add(self, qtensors: dict[str, QTensor], floats: dict[str, torch.Tensor],
            quantizers: dict[str, InputQuantizer]) -> None:
        """Queue one group: its QTensors, float tensors, and the input quantizers of its quantized linears
        (quantizers of modules whose weight is not in ``qtensors`` belong to another group and are skipped)."""
        quantizers = {m: q for m, q in quantizers.items() if f"{m}.weight" in qtensors}
        tensors, entries = encode_quantized(qtensors, quantizers)
        tensors.update(floats)
        self.writer.add(tensors, entries)

    def finish(self) -> list[Path]:
        """Write the last shard (and the index when there are several); returns the weight files."""
        return self.writer.finish()


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


def weight_files(path: Path) -> list[Path]:
    """The files behind a lowbit weights path: ``path`` itself when it is a file; else, for
    ``<folder>/model.safetensors`` of a sharded output (or the folder), the shards its index names."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir() and path.name != WEIGHTS_FILE:
        raise LowbitError(f"{path} does not exist")
    folder = path if path.is_dir() else path.parent
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    if (folder / INDEX_FILE).is_file():
        return sorted(set(read_weight_map(folder).values()))
    raise LowbitError(f"{folder} has neither {WEIGHTS_FILE} nor {INDEX_FILE}; is it a lowbit output folder?")


def weight_file_names(folder: Path) -> set[str]:
    """Names of the files in a checkpoint folder that hold its weights (``model.safetensors``, or the shards and
    their index): what a copy of the folder's other files (tokenizer, chat template) must leave out."""
    folder = Path(folder)
    names = {WEIGHTS_FILE, INDEX_FILE}
    if (folder / INDEX_FILE).is_file() and not (folder / WEIGHTS_FILE).is_file():
        names |= {f.name for f in weight_files(folder)}
    return names


def weights_bytes(path: Path) -> int:
    """Bytes on disk of a checkpoint's weights: the one file, or every shard."""
    return sum(f.stat().st_size for f in weight_files(path))


def read_header(path: Path) -> tuple[dict, dict]:
    """(tensor table, lowbit metadata) of a checkpoint's weights, without reading tensor data; for a sharded
    checkpoint the tables and the ``quantized`` entries of every shard together."""
    header: dict = {}
    meta: dict = {}
    for file in weight_files(path):
        table, own = _read_file_header(file)
        header.update(table)
        if own and not meta:
            meta = {**own, "quantized": dict(own.get("quantized", {}))}
        elif own:
            if own.get("format_version") != meta.get("format_version"):
                raise LowbitError(f"{file} has format version {own.get('format_version')}, the other shards "
                                  f"{meta.get('format_version')}; the shards do not belong together")
            meta["quantized"].update(own.get("quantized", {}))
    return header, meta


def _read_file_header(path: Path) -> tuple[dict, dict]:
    validate_safetensors(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", {}) or {}
    if "lowbit" not in meta:
        return header, {}
    try:
        own = json.loads(meta["lowbit"])
    except (ValueError, RecursionError) as exc:  # JSONDecodeError; RecursionError: arrays nested 100,000 deep
        raise LowbitError(f"{path}: its 'lowbit' metadata is not JSON ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:200]}); the checkpoint is corrupt") from None
    if not isinstance(own, dict):
        raise LowbitError(f"{path}: its 'lowbit' metadata is a JSON {type(own).__name__}, not an object; the "
                          "checkpoint is corrupt")
    return header, own


def read_qtensors(path: Path) -> tuple[dict[str, QTensor], dict[str, torch.Tensor]]:
    """All QTensors and float tensors stored in a lowbit weights file (or every shard of a sharded one)."""
    qtensors: dict[str, QTensor] = {}
    floats: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        q, f = _read_file_qtensors(file)
        qtensors.update(q)
        floats.update(f)
    return qtensors, floats


def _read_file_qtensors(path: Path) -> tuple[dict[str, QTensor], dict[str, torch.Tensor]]:
    _, meta = _read_file_header(path)
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
    """Activation spec and static scale (or None) of every linear whose input is quantized (every shard)."""
    out = {}
    for file in weight_files(path):
        _, meta = _read_file_header(file)
        with safe_open(str(file), framework="pt") as f:
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
