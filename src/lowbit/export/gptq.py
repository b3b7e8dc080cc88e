"""``lowbit export gptq``: a lowbit checkpoint as a GPTQ checkpoint (AutoGPTQ/GPTQModel layout, v1 zeros).

Per quantized linear ``M`` (weight [out, in], groups of G along the input, ``n_groups = ceil(in/G)``):
- ``M.qweight`` int32 [in*b/32, out]: for each output column, the b-bit unsigned codes along the input as
  one LSB-first bit stream (int32_packing.py; for 3 bits this is GPTQ's 10 + split + 10 + split + 10 layout);
- ``M.qzeros`` int32 [n_groups, out*b/32]: zero points packed the same way along the output dimension;
  checkpoint format ``gptq`` (v1, the default) stores ``z - 1`` (symmetric 4-bit: 0x77777777), ``gptq_v2``
  stores ``z``;
- ``M.scales`` float16 [n_groups, out]; ``M.g_idx`` int32 [in] = i // G (groups are contiguous: lowbit's
  act-order only changes the order GPTQ visits columns, not which columns share a scale, so desc_act is
  false). Per-channel specs are group_size -1 with one group.
The dequantized weight is ``W[o, i] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o])``. Symmetric codes
are stored unsigned with ``z = 2^(b-1)``; a row's last group may be shorter (scales have ceil(in/G) rows,
as AutoGPTQ allocates them). config.json gets ``quantization_config`` (quant_method "gptq", bits,
group_size, desc_act, sym, format/checkpoint_format) and quantize_config.json the same for GPTQModel;
linears kept in float are listed in GPTQModel's ``dynamic`` as ``-:`` exclusions.

Verification: transformers loads GPTQ folders only through optimum + gptqmodel, and gptqmodel (7.x) builds
from source and needs torch >= 2.14, newer than the torch this project pins, so no GPTQ reader runs here.
The tests decode the files with an independent loop-based reader written from the documented layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.export.hf_checkpoint import CheckpointSource, read_source, single_weight_spec, write_hf_folder
from lowbit.export.holders import cannot_hold, check_integer_zeros, fp16_scales, unsigned_codes
from lowbit.export.int32_packing import pack_cols_int32, pack_rows_int32
from lowbit.formats.qtensor import QTensor
from lowbit.formats.spec import QuantSpec

BITS = (2, 3, 4, 8)
VERSIONS = ("gptq", "gptq_v2")
HOLDS_TEXT = "int2/int3/int4/int8 per channel or in groups, symmetric or asymmetric, with fp16 scales"


@dataclass(frozen=True)
class GPTQOptions:
    """What ``lowbit export gptq`` was asked for."""

    checkpoint: str
    out: str
    checkpoint_format: str = "gptq"
    force: bool = False


def holds(spec: QuantSpec) -> bool:
    """Whether a GPTQ checkpoint can store tensors of this spec (scale exactness is checked per tensor)."""
    return (spec.format in {f"int{b}" for b in BITS} and spec.granularity in ("group", "channel")
            and spec.scale_dtype in ("fp16", "bf16", "fp32"))


def module_tensors(name: str, qt: QTensor, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales and g_idx of one quantized linear (names without the module prefix)."""
    spec = qt.spec
    if not holds(spec):
        raise LowbitError(cannot_hold(name, spec, "GPTQ", HOLDS_TEXT))
    check_integer_zeros(name, qt, "GPTQ")
    out_features, in_features = qt.codes.shape
    bits = spec.bits
    for what, n in (("input", in_features), ("output", out_features)):
        if n * bits % 32:
            raise LowbitError(f"{name}: GPTQ packs {bits}-bit codes into 32-bit words, so the {what} size must be "
                              f"a multiple of {32 // math.gcd(bits, 32)}, got {n}; keep it in float (--ignore)")
    codes, zeros = unsigned_codes(qt)
    stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
    if int(stored_zeros.min()) < 0:
        raise LowbitError(f"{name}: a zero point of 0 cannot be stored in GPTQ v1 (it keeps z - 1); "
                          "export with --checkpoint-format gptq_v2")
    group = spec.group_size if spec.granularity == "group" else in_features
    return {
        "qweight": pack_cols_int32(codes.t().contiguous(), bits),
        "qzeros": pack_rows_int32(stored_zeros.t().contiguous(), bits),
        "scales": fp16_scales(name, qt.scales, "GPTQ").t().contiguous(),
        "g_idx": (torch.arange(in_features, dtype=torch.int32) // group).to(torch.int32),
    }


def export_gptq(opts: GPTQOptions) -> dict:
    """Write the GPTQ folder for a lowbit checkpoint; returns a summary (path, bits, group size, bytes)."""
    if opts.checkpoint_format not in VERSIONS:
        raise LowbitError(f"unknown GPTQ checkpoint format {opts.checkpoint_format!r}; use {' or '.join(VERSIONS)}")
    source = read_source(opts.checkpoint)
    spec = single_weight_spec(source, "GPTQ")
    tensors: dict[str, torch.Tensor] = {}
    for name, module in source.modules.items():
        for local, t in module_tensors(name, module.qtensor, opts.checkpoint_format).items():
            tensors[f"{name}.{local}"] = t
    qconfig = gptq_config(source, spec, opts.checkpoint_format)
    summary = write_hf_folder(source, opts.out, tensors, qconfig, f"gptq:{opts.checkpoint_format}",
                              extra_files={"quantize_config.json": qconfig}, force=opts.force)
    summary.update(bits=spec.bits, group_size=qconfig["group_size"], sym=spec.symmetric)
    return summary


def gptq_config(source: CheckpointSource, spec: QuantSpec, checkpoint_format: str) -> dict:
    """The GPTQ ``quantization_config`` (also written as quantize_config.json)."""
    config = {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size if spec.granularity == "group" else -1,
        "desc_act": False,
        "sym": spec.symmetric,
        "true_sequential": True,
        "lm_head": False,
        "format": checkpoint_format,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"lowbit:{__version__}"], "lowbit_spec": str(spec),
                 "method": source.manifest.get("method")},
    }
    excluded = [n for n in source.float_linears() if n != "lm_head"]
    if excluded:
        config["dynamic"] = {f"-:^{_escape(n)}$": {} for n in excluded}
    return config


def _escape(name: str) -> str:
    return name.replace(".", r"\.")


def export_gptq_folder(checkpoint: str | Path, out: str | Path, checkpoint_format: str = "gptq",
                       force: bool = False) -> dict:
    """Convenience wrapper: ``export_gptq`` from plain arguments."""
    return export_gptq(GPTQOptions(str(checkpoint), str(out), checkpoint_format, force))
