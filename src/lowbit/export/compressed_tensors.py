"""``lowbit export hf``: a lowbit checkpoint as a compressed-tensors Hugging Face folder (vLLM, transformers).

The folder is what llm-compressor writes: model.safetensors with each quantized linear's tensors in the
layout of its storage format (ct_formats.py), float tensors as stored, and config.json whose
``quantization_config`` is compressed-tensors' ``QuantizationConfig`` (``quant_method`` "compressed-tensors",
``config_groups`` with ``targets``, ``weights`` and ``input_activations``, ``ignore``, ``format``,
``quantization_status`` "compressed"). Modules sharing one (weight spec, activation spec, format) form one
config group; a single group targets ``Linear`` and ignores the linears kept in float, several groups
target module names. Static activation scales are written as ``<module>.input_scale``. Only Linear
layers are written quantized: a quantized token embedding or output head is written dequantized (see
``hf_checkpoint``; transformers cannot load a quantized Embedding, vLLM does not quantize the head). Specs no
compressed-tensors format holds (ternary, NF4, log2, fp8_e5m2, ...) and groups that do not divide a row
are refused with a one-line error before anything is written, and so are families whose projections are
transformers ``Conv1D`` (GPT-2: ``transposed_linear`` in the architecture table): lowbit quantizes them as
linears, but transformers builds them as ``Conv1D`` again and compressed-tensors only decompresses ``nn.Linear``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from lowbit.errors import LowbitError
from lowbit.export import ct_formats
from lowbit.export.hf_checkpoint import CheckpointSource, QuantizedModule, read_source, write_hf_folder
from lowbit.export.holders import cannot_hold, check_integer_zeros

COMPRESSED_TENSORS_VERSION = "0.20.0"  # the release whose readers this writer is checked against
AUTO = "auto"


@dataclass(frozen=True)
class CompressedTensorsOptions:
    """What ``lowbit export hf`` was asked for."""

    checkpoint: str
    out: str
    format: str = AUTO
    force: bool = False


def export_compressed_tensors(opts: CompressedTensorsOptions) -> dict:
    """Write the compressed-tensors folder for a lowbit checkpoint; returns a summary (path, format, bytes)."""
    forced = None if opts.format == AUTO else ct_formats.get_format(opts.format).name
    _refuse_transposed_linears(Path(opts.checkpoint))
    source = read_source(opts.checkpoint)
    if not source.modules:
        raise LowbitError(f"{opts.checkpoint} has no quantized tensors; nothing to write as compressed-tensors")
    formats = {name: _module_format(source, m, forced) for name, m in source.modules.items()}
    _check_whole_groups(source)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in source.modules.items():
        for local, t in formats[name].write(module.qtensor).items():
            tensors[f"{name}.{local}"] = t
        if module.input_scale is not None:
            tensors[f"{name}.input_scale"] = module.input_scale.to(torch.float32).reshape(1)
    config = quantization_config(source, formats)
    summary = write_hf_folder(source, opts.out, tensors, config, f"compressed-tensors:{config['format']}",
                              force=opts.force)
    summary["groups"] = len(config["config_groups"])
    return summary


def _refuse_transposed_linears(folder: Path) -> None:
    """Refuse a family whose projections transformers builds as ``Conv1D`` (GPT-2): compressed-tensors
    would leave them compressed (it decompresses ``nn.Linear`` only), so the folder could not be loaded."""
    from lowbit.arch import family_of

    config_file = folder / "config.json"
    if not config_file.is_file():
        return  # read_source says what is wrong with the folder
    model_type = json.loads(config_file.read_text()).get("model_type")
    family = family_of(SimpleNamespace(model_type=model_type))
    if family is not None and family.transposed_linear:
        raise LowbitError(f"{folder}: {family.name}'s projections are transformers Conv1D layers, not nn.Linear, "
                          "and compressed-tensors cannot load them quantized; write `lowbit export onnx` or "
                          "`lowbit export gguf` instead")


def _module_format(source: CheckpointSource, module: QuantizedModule, forced: str | None) -> ct_formats.CTFormat:
    if source.module_types[module.name] != "Linear":  # transformers cannot load a quantized (tied) Embedding
        raise LowbitError(f"{module.name}: lowbit writes quantized Linear layers only as compressed-tensors; keep "
                          f"this {source.module_types[module.name]} in float (drop its rule)")
    spec = module.qtensor.spec
    fmt = ct_formats.choose_format(spec, module.activation, forced)
    if fmt is None:
        target = f"compressed-tensors {forced}" if forced else "compressed-tensors"
        holds = ct_formats.get_format(forced).holds_text if forced else ct_formats.HOLDS_TEXT
        raise LowbitError(cannot_hold(module.name, spec, target, holds))
    check_integer_zeros(module.name, module.qtensor, "compressed-tensors")
    if module.activation is not None:
        ct_formats.activation_args(module.activation)  # refuses activation formats it cannot describe
    return fmt


def _check_whole_groups(source: CheckpointSource) -> None:
    """Refuse grouped specs whose group size does not divide a row: compressed-tensors has no short last group."""
    ragged = [(m.name, m.qtensor.codes.shape[1], m.qtensor.spec.group_size) for m in source.modules.values()
              if m.qtensor.spec.granularity == "group" and m.qtensor.codes.shape[1] % m.qtensor.spec.group_size]
    if not ragged:
        return
    name, cols, group = ragged[0]
    rows = [m.qtensor.codes.shape[1] for m in source.modules.values()]
    hint = _dividing_group_size(rows, group)
    fix = f"re-quantize with --group-size {hint} (divides every row)" if hint else "re-quantize per channel"
    raise LowbitError(f"compressed-tensors cannot hold a shorter last group: {len(ragged)} tensors (e.g. {name}, "
                      f"rows of {cols}) are not whole groups of {group}; {fix}, or write `lowbit export gptq`")


def _dividing_group_size(rows: list[int], group: int) -> int | None:
    """The largest power of two, at most ``group`` and at least 16, that divides every row (None if none)."""
    size = 1 << (group.bit_length() - 1)
    while size >= 16:
        if all(r % size == 0 for r in rows):
            return size
        size //= 2
    return None


def quantization_config(source: CheckpointSource, formats: dict[str, ct_formats.CTFormat]) -> dict:
    """config.json's ``quantization_config``, field for field as compressed-tensors' ModelCompressor writes it."""
    groups: dict[tuple, list[str]] = {}
    for name, module in source.modules.items():
        act = None if module.activation is None else ct_formats.activation_args(module.activation)
        key = (repr(ct_formats.weight_args(module.qtensor.spec)), repr(act), formats[name].name)
        groups.setdefault(key, []).append(name)
    config_groups = {}
    for i, names in enumerate(groups.values()):
        module = source.modules[names[0]]
        act = None if module.activation is None else ct_formats.activation_args(module.activation)
        config_groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(groups) == 1 else sorted(names),
            "weights": ct_formats.weight_args(module.qtensor.spec),
            "input_activations": act,
            "output_activations": None,
            "format": formats[names[0]].name,
        }
    used = {g["format"] for g in config_groups.values()}
    return {
        "config_groups": config_groups,
        "format": used.pop() if len(used) == 1 else "mixed-precision",
        "global_compression_ratio": None,
        "ignore": source.float_linears(),
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


def export_hf(checkpoint: str | Path, out: str | Path, format: str = AUTO, force: bool = False) -> dict:
    """Convenience wrapper: ``export_compressed_tensors`` from plain arguments."""
    return export_compressed_tensors(CompressedTensorsOptions(str(checkpoint), str(out), format, force))
