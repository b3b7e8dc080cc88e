"""``lowbit export hf``, ``gptq`` and ``awq``: a lowbit checkpoint as a Hugging Face folder (vLLM, HF)."""

from __future__ import annotations

import argparse
import json
from typing import Any

HF_EXAMPLES = """examples:
  lowbit quantize --scheme W4A16 --group-size 64 --out out/w4      # SmolLM2's rows (576, 1536) are whole g64 groups
  lowbit export hf out/w4 --out out/w4-ct                         # pack-quantized, loads in vLLM and transformers
  lowbit export hf out/w8a8 --out out/w8a8-ct                      # int8 weights + int8 activations: int-quantized
  lowbit export hf out/w4 --out out/w4-naive --format naive-quantized
"""

GPTQ_EXAMPLES = """examples:
  lowbit quantize --scheme W4A16 --method gptq --out out/w4        # int4 groups of 128
  lowbit export gptq out/w4 --out out/w4-gptq                     # qweight/qzeros/scales/g_idx, v1 zeros
  lowbit export gptq out/w4 --out out/w4-gptq2 --checkpoint-format gptq_v2
"""

AWQ_EXAMPLES = """examples:
  lowbit quantize --scheme W4A16 --method awq --asym --group-size 64 --out out/w4   # 64 divides SmolLM2's 576
  lowbit export awq out/w4 --out out/w4-awq                       # qweight/qzeros/scales, version gemm
"""


def add_hf_targets(targets: Any) -> None:
    """Register the ``hf`` (compressed-tensors), ``gptq`` and ``awq`` targets on ``lowbit export``'s subparsers."""
    from lowbit.export.ct_formats import FORMAT_NAMES
    from lowbit.export.gptq import VERSIONS

    h = targets.add_parser("hf", help="write a compressed-tensors folder (vLLM, transformers) from a lowbit checkpoint",
                           epilog=HF_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    h.add_argument("checkpoint", help="a folder written by lowbit quantize")
    h.add_argument("--out", required=True, help="output folder")
    h.add_argument("--format", default="auto", choices=("auto",) + FORMAT_NAMES,
                   help="storage format (default auto: what llm-compressor would choose for each spec)")
    h.add_argument("--force", action="store_true", help="replace an existing output folder")
    h.add_argument("--json", action="store_true", help="print the summary as JSON")
    h.set_defaults(handler=cmd_export_hf)

    g = targets.add_parser("gptq", help="write a GPTQ checkpoint (qweight/qzeros/scales/g_idx) from a lowbit one",
                           epilog=GPTQ_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("checkpoint", help="a folder written by lowbit quantize (int2/3/4/8 weights, weight-only)")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--checkpoint-format", default="gptq", choices=VERSIONS,
                   help="gptq (v1: zero points stored minus one, default) or gptq_v2")
    g.add_argument("--force", action="store_true", help="replace an existing output folder")
    g.add_argument("--json", action="store_true", help="print the summary as JSON")
    g.set_defaults(handler=cmd_export_gptq)

    a = targets.add_parser("awq", help="write an AutoAWQ GEMM checkpoint (qweight/qzeros/scales) from a lowbit one",
                           epilog=AWQ_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("checkpoint", help="a folder written by lowbit quantize (int4 weights, weight-only, whole groups)")
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("--force", action="store_true", help="replace an existing output folder")
    a.add_argument("--json", action="store_true", help="print the summary as JSON")
    a.set_defaults(handler=cmd_export_awq)


def cmd_export_hf(args: argparse.Namespace) -> None:
    from lowbit.export.compressed_tensors import CompressedTensorsOptions, export_compressed_tensors

    summary = export_compressed_tensors(CompressedTensorsOptions(args.checkpoint, args.out, args.format, args.force))
    _print(summary, args.json, f"{summary['groups']} config group(s)")


def cmd_export_gptq(args: argparse.Namespace) -> None:
    from lowbit.export.gptq import GPTQOptions, export_gptq

    summary = export_gptq(GPTQOptions(args.checkpoint, args.out, args.checkpoint_format, args.force))
    group = "per channel" if summary["group_size"] == -1 else f"groups of {summary['group_size']}"
    _print(summary, args.json, f"{summary['bits']}-bit, {group}, {'sym' if summary['sym'] else 'asym'}")


def cmd_export_awq(args: argparse.Namespace) -> None:
    from lowbit.export.awq import AWQOptions, export_awq

    summary = export_awq(AWQOptions(args.checkpoint, args.out, args.force))
    group = "per channel" if summary["group_size"] == -1 else f"groups of {summary['group_size']}"
    _print(summary, args.json, f"{summary['bits']}-bit, {group}, {'sym' if summary['sym'] else 'asym'}")


def _print(summary: dict, as_json: bool, detail: str) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(f"wrote {summary['path']} ({summary['format']}, {detail}): {summary['quantized']} quantized tensors, "
          f"{summary['bytes'] / 1e6:.2f} MB of weights")
    if summary["float_linears"]:
        print(f"  kept in float: {', '.join(summary['float_linears'])}")
