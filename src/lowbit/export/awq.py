"""``lowbit export awq``: a lowbit checkpoint as an AutoAWQ GEMM checkpoint (W4A16, ``version: gemm``).

Per quantized linear ``M`` (weight [out, in], groups of G along the input, ``n_groups = in/G``):
- ``M.qweight`` int32 [in, out/8]: row ``i`` holds the 4-bit unsigned codes of input ``i`` for every output,
  eight outputs per word, packed along the OUTPUT dimension (unlike GPTQ, which packs along the input) and
  interleaved: nibble ``j`` (bits 4j..4j+3) of word ``k`` holds output column ``8k + ORDER[j]`` with
  ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`` (readers undo it with ``[0, 4, 1, 5, 2, 6, 3, 7]``);
- ``M.qzeros`` int32 [n_groups, out/8]: zero points packed the same way, stored as they are (no minus one);
- ``M.scales`` float16 [n_groups, out]; there is no ``g_idx``: input ``i`` belongs to group ``i // G``.
The dequantized weight is ``W[o, i] = scales[i // G, o] * (q[i, o] - z[i // G, o])``. AWQ's kernels need
whole groups (``in % G == 0``) and whole words (``out % 8 == 0``): a ragged last group, which lowbit and
GPTQ allow, is refused here. Per-channel specs are group_size -1 with one group. The GEMM layout always
carries zero points, so symmetric codes are stored unsigned with ``z = 8`` and ``zero_point`` is true
(AutoAWQ's GEMM packer itself refuses ``zero_point: false``; the symmetric spec survives in ``meta``).
config.json gets ``quantization_config`` (quant_method "awq", bits 4, group_size, zero_point,
version "gemm", modules_to_not_convert: the linears kept in float), the fields transformers' AwqConfig and
AutoAWQ read; quant_config.json repeats them under AutoAWQ's older names (q_group_size, w_bit, "GEMM").

Verification: AutoAWQ needs CUDA kernels (and is archived), and transformers loads AWQ folders only through
gptqmodel, which needs a newer torch than the project pins, so no AWQ reader runs here. The tests decode
the files with an independent loop-based reader written from the documented layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.export.hf_checkpoint import CheckpointSource, read_source, single_weight_spec, write_hf_folder
from lowbit.export.holders import cannot_hold, check_integer_zeros, fp16_scales, unsigned_codes
from lowbit.export.int32_packing import pack_rows_int32
from lowbit.formats.qtensor import QTensor
from lowbit.formats.spec import QuantSpec

BITS = 4
PACK = 32 // BITS
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
HOLDS_TEXT = "int4 per channel or in groups that divide the input size, symmetric or asymmetric, with fp16 scales"


@dataclass(frozen=True)
class AWQOptions:
    """What ``lowbit export awq`` was asked for."""

    checkpoint: str
    out: str
    force: bool = False


def holds(spec: QuantSpec) -> bool:
    """Whether an AWQ GEMM checkpoint can store tensors of this spec (shapes and scales are checked per tensor)."""
    return (spec.format == f"int{BITS}" and spec.granularity in ("group", "channel")
            and spec.scale_dtype in ("fp16", "bf16", "fp32"))


def pack_awq_int32(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes (rows, n) along each row in AWQ's interleaved order: (rows, n/8) int32.

    Permuting every run of eight columns by ``ORDER`` turns AWQ's layout into a plain LSB-first stream.
    """
    rows, n = codes.shape
    interleaved = codes.reshape(rows, n // PACK, PACK)[:, :, list(ORDER)].reshape(rows, n)
    return pack_rows_int32(interleaved, BITS)


def module_tensors(name: str, qt: QTensor) -> dict[str, torch.Tensor]:
    """qweight, qzeros and scales of one quantized linear (names without the module prefix)."""
    spec = qt.spec
    if not holds(spec):
        raise LowbitError(cannot_hold(name, spec, "AWQ GEMM", HOLDS_TEXT))
    check_integer_zeros(name, qt, "AWQ")
    out_features, in_features = qt.codes.shape
    if out_features % PACK:
        raise LowbitError(f"{name}: AWQ packs 8 output channels into each 32-bit word, so the output size must be "
                          f"a multiple of 8, got {out_features}; keep it in float (--ignore)")
    group = spec.group_size if spec.granularity == "group" else in_features
    if in_features % group:
        raise LowbitError(f"{name}: AWQ GEMM holds whole groups only, and the input size {in_features} is not a "
                          f"multiple of {group}; re-quantize with a group size that divides it, keep it in float "
                          "(--ignore), or write GPTQ (`lowbit export gptq`), which holds a ragged last group")
    codes, zeros = unsigned_codes(qt)
    return {
        "qweight": pack_awq_int32(codes.t().contiguous()),
        "qzeros": pack_awq_int32(zeros.t().contiguous()),
        "scales": fp16_scales(name, qt.scales, "AWQ").t().contiguous(),
    }


def export_awq(opts: AWQOptions) -> dict:
    """Write the AWQ GEMM folder for a lowbit checkpoint; returns a summary (path, group size, bytes)."""
    source = read_source(opts.checkpoint)
    spec = single_weight_spec(source, "AWQ")
    tensors: dict[str, torch.Tensor] = {}
    for name, module in source.modules.items():
        for local, t in module_tensors(name, module.qtensor).items():
            tensors[f"{name}.{local}"] = t
    qconfig = awq_config(source, spec)
    summary = write_hf_folder(source, opts.out, tensors, qconfig, "awq:gemm",
                              extra_files={"quant_config.json": autoawq_quant_config(qconfig)}, force=opts.force)
    summary.update(bits=BITS, group_size=qconfig["group_size"], sym=spec.symmetric)
    return summary


def awq_config(source: CheckpointSource, spec: QuantSpec) -> dict:
    """The AWQ ``quantization_config`` of config.json (the keys transformers' AwqConfig reads)."""
    return {
        "quant_method": "awq",
        "bits": BITS,
        "group_size": spec.group_size if spec.granularity == "group" else -1,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": source.float_linears() or None,
        "meta": {"quantizer": [f"lowbit:{__version__}"], "lowbit_spec": str(spec),
                 "method": source.manifest.get("method")},
    }


def autoawq_quant_config(qconfig: dict) -> dict:
    """The same settings under AutoAWQ's own key names (quant_config.json, which older AutoAWQ releases read)."""
    return {"zero_point": qconfig["zero_point"], "q_group_size": qconfig["group_size"], "w_bit": qconfig["bits"],
            "version": "GEMM", "modules_to_not_convert": qconfig["modules_to_not_convert"]}


def export_awq_folder(checkpoint: str | Path, out: str | Path, force: bool = False) -> dict:
    """Convenience wrapper: ``export_awq`` from plain arguments."""
    return export_awq(AWQOptions(str(checkpoint), str(out), force))
