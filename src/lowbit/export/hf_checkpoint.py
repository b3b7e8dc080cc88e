"""The side the Hugging Face exporters share: read a lowbit checkpoint folder, write a loadable HF folder.

The exporters (compressed-tensors, GPTQ, AWQ) consume only what ``lowbit quantize`` wrote: QTensors, float
tensors, activation specs and static input scales, config.json and the tokenizer files. They never
quantize. Which modules are ``nn.Linear`` (needed for ``targets``/``ignore`` lists) is read from the model
class transformers builds for config.json on the meta device, so no architecture is hand-listed here.
The output folder is written atomically: nothing half-written remains when an exporter raises.
A quantized token embedding or output head is written dequantized, in the checkpoint's float dtype, and listed
under ``dequantized`` in lowbit_export.json: transformers cannot load a quantized Embedding, and vLLM builds
the head as an embedding-like layer that compressed-tensors, GPTQ and AWQ do not quantize.
GPTQ and AWQ declare one weight spec for the whole model (``single_weight_spec``).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.formats.activation import ActivationSpec
from lowbit.formats.qtensor import QTensor
from lowbit.formats.quantize import dequantize
from lowbit.formats.spec import QuantSpec
from lowbit.io_utils import atomic_directory
from lowbit.model.checkpoint import (WEIGHTS_FILE, read_input_quantizers, read_manifest, read_qtensors,
                                     weight_file_names)
from lowbit.model.load import CAUSAL_LM

EXPORT_MANIFEST = "lowbit_export.json"
EXPORT_FORMAT_VERSION = 1
NOT_COPIED = {WEIGHTS_FILE, "config.json", "lowbit.json", "report.json", "recipe.yaml"}
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


@dataclass(frozen=True)
class QuantizedModule:
    """One quantized module: its weight's QTensor, and how its input is quantized (None: weight-only)."""

    name: str
    qtensor: QTensor
    activation: ActivationSpec | None = None
    input_scale: torch.Tensor | None = None


@dataclass(frozen=True)
class CheckpointSource:
    """Everything an exporter needs from a lowbit checkpoint folder."""

    folder: Path
    manifest: dict
    config: dict
    modules: dict[str, QuantizedModule]
    floats: dict[str, torch.Tensor]
    module_types: dict[str, str]
    dequantized: dict[str, str] = field(default_factory=dict)  # parameter -> spec it was quantized with

    @property
    def float_dtype(self) -> torch.dtype:
        """The dtype most float tensors are stored in (what the exported model computes in)."""
        counts = Counter(t.dtype for t in self.floats.values() if t.is_floating_point())
        return counts.most_common(1)[0][0] if counts else torch.float16

    def float_linears(self) -> list[str]:
        """Names of the ``nn.Linear`` modules kept in float (the exporters' ignore lists)."""
        return sorted(n for n, kind in self.module_types.items() if kind == "Linear" and n not in self.modules)


def read_source(folder: str | Path) -> CheckpointSource:
    """Read a folder written by ``lowbit quantize``; a one-line error if it is not one."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    qtensors, floats = read_qtensors(folder / WEIGHTS_FILE)
    inputs = read_input_quantizers(folder / WEIGHTS_FILE)
    module_types, head = _module_types(folder, manifest.get("kind", CAUSAL_LM))
    modules: dict[str, QuantizedModule] = {}
    dequantized: dict[str, str] = {}
    for param, qt in qtensors.items():
        name = param.removesuffix(".weight")
        if param.endswith(".weight") and (module_types.get(name) == "Embedding" or name == head):
            floats[param] = dequantize(qt).to(_float_dtype(floats))
            dequantized[param] = str(qt.spec)
            continue
        if not param.endswith(".weight") or name not in module_types:
            raise LowbitError(f"{param}: only the weights of Linear modules can be exported to Hugging Face "
                              "formats; keep this tensor in float (--ignore)")
        spec, scale = inputs.get(name, (None, None))
        modules[name] = QuantizedModule(name, qt, spec, scale)
    config = json.loads((folder / "config.json").read_text())
    return CheckpointSource(folder, manifest, config, modules, floats, module_types, dequantized)


def _float_dtype(floats: dict[str, torch.Tensor]) -> torch.dtype:
    counts = Counter(t.dtype for t in floats.values() if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float16


def single_weight_spec(source: CheckpointSource, target: str) -> QuantSpec:
    """The one weight spec a GPTQ or AWQ checkpoint is declared with.

    Both formats hold weight-only quantized Linear layers with one bit width and group size for the whole
    model; anything else is refused in one line that names the exporter that can write it.
    """
    if not source.modules:
        raise LowbitError(f"{source.folder} has no quantized tensors; nothing to write as {target}")
    for name in source.modules:
        if source.module_types[name] != "Linear":
            raise LowbitError(f"{name}: {target} checkpoints quantize Linear layers only; keep this "
                              f"{source.module_types[name]} in float (drop its rule)")
    with_act = [m.name for m in source.modules.values() if m.activation is not None]
    if with_act:
        raise LowbitError(f"{target} checkpoints are weight-only, but {len(with_act)} linears (e.g. {with_act[0]}) "
                          "quantize their inputs; write `lowbit export hf` (compressed-tensors) instead")
    keys = {(m.qtensor.spec.format, m.qtensor.spec.granularity, m.qtensor.spec.group_size, m.qtensor.spec.symmetric)
            for m in source.modules.values()}
    if len(keys) > 1:
        specs = sorted({str(m.qtensor.spec) for m in source.modules.values()})
        raise LowbitError(f"a {target} checkpoint has one bit width and group size, but this one mixes "
                          f"{', '.join(specs)}; write `lowbit export hf` (compressed-tensors groups) instead")
    return next(iter(source.modules.values())).qtensor.spec


def _module_types(folder: Path, kind: str) -> tuple[dict[str, str], str | None]:
    """({module name: 'Linear' | 'Embedding'}, output head name or None) of the model config.json describes,
    built on the meta device."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    auto = AutoModelForCausalLM if kind == CAUSAL_LM else AutoModel
    with torch.device("meta"):
        model = auto.from_config(config)
    types = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            types[name] = "Linear"
        elif isinstance(module, torch.nn.Embedding):
            types[name] = "Embedding"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return types, next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def write_hf_folder(
    source: CheckpointSource,
    out: str | Path,
    tensors: dict[str, torch.Tensor],
    quantization_config: dict,
    format_name: str,
    extra_files: dict[str, dict] | None = None,
    force: bool = False,
) -> dict:
    """Write ``tensors`` (plus the float tensors), config.json with ``quantization_config``, the tokenizer.

    ``extra_files`` are further JSON files (e.g. GPTQ's quantize_config.json). Returns a summary.
    """
    all_tensors = {name: t.contiguous() for name, t in source.floats.items()}
    all_tensors.update({name: t.contiguous() for name, t in tensors.items()})
    config = dict(source.config)
    dtype_name = DTYPE_NAMES.get(source.float_dtype, "float16")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    config["quantization_config"] = quantization_config
    out = Path(out)
    with atomic_directory(out, force=force) as tmp:
        save_file(all_tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        for name, content in (extra_files or {}).items():
            _write_json(tmp / name, content)
        _write_json(tmp / EXPORT_MANIFEST, {"format_version": EXPORT_FORMAT_VERSION, "lowbit_version": __version__,
                                            "format": format_name, "source": str(source.folder),
                                            "made_from": source.manifest, "dequantized": source.dequantized})
        skipped = NOT_COPIED | weight_file_names(source.folder)  # a streamed output's shards and index too
        for path in sorted(source.folder.iterdir()):
            if path.is_file() and path.name not in skipped:
                shutil.copy2(path, tmp / path.name)
    return {"path": str(out), "format": format_name, "bytes": (out / WEIGHTS_FILE).stat().st_size,
            "quantized": len(source.modules), "float_linears": source.float_linears(),
            "dequantized": sorted(source.dequantized)}


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=False) + "\n")
