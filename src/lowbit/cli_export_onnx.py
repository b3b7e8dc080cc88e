"""``lowbit export onnx``: an encoder, a causal LM's float graph, or any lowbit checkpoint as ONNX."""

from __future__ import annotations

import argparse
import json
from typing import Any

ONNX_EXAMPLES = """examples:
  lowbit export onnx --out out/minilm-int8.onnx              # built-in MiniLM, int8 kernels (W8A8, GPTQ)
  lowbit export onnx --mode float --out out/minilm.onnx      # the float graph (mean-pooled embedding output)
  lowbit export onnx --mode qdq --scheme W8A8 --out q.onnx   # explicit QuantizeLinear/DequantizeLinear pairs
  lowbit export onnx --mode qdq --scheme W4A16 --out w4.onnx # int4 weights as blocked DequantizeLinear (g128)
  lowbit export onnx --method rtn --token-linears 0 --no-smooth --out fast.onnx   # no calibration
  lowbit export onnx path/to/bert_folder --keep '*.output.dense' --out b.onnx
  lowbit export onnx out/w4 --out out/w4.onnx                # a lowbit checkpoint: int4 linears as MatMulNBits
  lowbit export onnx smollm2 --mode float --out out/smollm2.onnx   # an LLM's float graph (with a KV cache)
  lowbit export onnx out/w4 --no-kv-cache --out w4-window.onnx     # input_ids -> logits, no cache

A causal LM's graph has a KV cache in the layout optimum and onnxruntime-genai use: inputs input_ids,
attention_mask, position_ids, past_key_values.N.key/value; outputs logits, present.N.key/value.
"""


def add_onnx_target(targets: Any) -> None:
    """Register the ``onnx`` target on ``lowbit export``'s subparsers."""
    from lowbit.export.onnx import EVAL_PARAGRAPHS, METHODS, MODES

    o = targets.add_parser("onnx", help="write an encoder or a lowbit checkpoint as ONNX for onnxruntime",
                           epilog=ONNX_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    o.add_argument("model", nargs="?", help="a lowbit checkpoint folder (LLM or encoder: its codes are written "
                                            "as they are), an HF encoder folder, or built-in 'minilm' (default)")
    o.add_argument("--out", help="output .onnx file (default out/<model>-<scheme>-<mode>.onnx)")
    o.add_argument("--mode", default="int8", choices=MODES,
                   help="int8: integer kernels onnxruntime fuses (default); qdq: explicit Q/DQ pairs; float")
    o.add_argument("--int8", dest="mode", action="store_const", const="int8", help="same as --mode int8")
    o.add_argument("--qdq", dest="mode", action="store_const", const="qdq", help="same as --mode qdq")
    o.add_argument("--scheme", default="W8A8", help="W8A8 (default), W8A16, W4A16, ... (integer schemes)")
    o.add_argument("--weights", help="weight spec override (int8 mode default: int7:channel, exact in the "
                                     "fast uint8 x int8 kernel)")
    o.add_argument("--act", dest="activations", help="activation spec for the linears' inputs "
                                                     "(int8 mode default: int8:tensor:dynamic:asym)")
    o.add_argument("--token-linears", type=int, default=3,
                   help="give this many linears, the most hurt by per-tensor input scales (measured on "
                        "calibration paragraphs, after smoothing), per-token scales (default 3)")
    o.add_argument("--no-smooth", dest="smooth", action="store_false",
                   help="no SmoothQuant input scaling (default: on for the linears that read their input alone, "
                        "where it at least halves the measured per-tensor loss)")
    o.add_argument("--smooth-alpha", type=float, default=0.5, help="SmoothQuant migration strength (default 0.5)")
    o.add_argument("--sensitivity-sentences", type=int, default=64,
                   help="calibration paragraphs the per-tensor sensitivity is measured on (default 64)")
    o.add_argument("--act-rule", dest="act_rules", action="append", default=[], metavar="PATTERN=ACTSPEC",
                   help="input spec for matching linears, e.g. '*.output.dense=int8:token:dynamic'")
    o.add_argument("--keep", action="append", default=[], metavar="PATTERN", help="leave matching modules in float")
    o.add_argument("--method", default="gptq", choices=METHODS, help="weight rounding (default gptq)")
    o.add_argument("--search", dest="scale_search", choices=("minmax", "mse"), help="scale search for rtn")
    o.add_argument("--embeddings", default="int8:channel",
                   help="spec for embedding tables, or 'keep' (default int8:channel: one scale per row)")
    o.add_argument("--recipe", dest="recipe_file", help="YAML recipe instead of scheme/rules")
    o.add_argument("--calib-text", help=f"calibration text (default: pydoc topics after the first {EVAL_PARAGRAPHS} "
                                        "paragraphs, which are the evaluation sentences)")
    o.add_argument("--calib-samples", type=int, default=64, help="GPTQ calibration windows (default 64)")
    o.add_argument("--calib-length", type=int, default=128, help="tokens per calibration window (default 128)")
    o.add_argument("--no-matmulnbits", dest="matmul_nbits", action="store_false",
                   help="checkpoints: write weight-only int linears as blocked DequantizeLinear, not MatMulNBits")
    o.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4),
                   help="checkpoints: MatMulNBits compute type; 4 int8 activations per block inside the kernel "
                        "(default: faster decode, slightly less exact), 0 float with exactly the stored weights")
    o.add_argument("--no-kv-cache", dest="kv_cache", action="store_false",
                   help="causal LMs: the whole-window graph (input_ids -> logits) instead of the KV-cache graph")
    o.add_argument("--force", action="store_true", help="replace an existing output file")
    o.add_argument("--json", action="store_true", help="print the summary as JSON")
    o.set_defaults(handler=cmd_export_onnx)


def cmd_export_onnx(args: argparse.Namespace) -> None:
    from lowbit.export.onnx import OnnxExportOptions, export_onnx
    from lowbit.export.onnx_checkpoint import OnnxCheckpointOptions, export_onnx_checkpoint, is_checkpoint

    if is_checkpoint(args.model):
        summary = export_onnx_checkpoint(OnnxCheckpointOptions(args.model, args.out, args.mode, args.matmul_nbits,
                                                               args.accuracy_level, kv_cache=args.kv_cache,
                                                               force=args.force))
        _print(summary, args.json)
        return
    embeddings = None if args.embeddings.lower() in ("keep", "float", "none") else args.embeddings
    opts = OnnxExportOptions(model=args.model, out=args.out, mode=args.mode, scheme=args.scheme, weights=args.weights,
                             activations=args.activations, scale_search=args.scale_search, method=args.method,
                             token_linears=args.token_linears, smooth=args.smooth,
                             smooth_alpha=args.smooth_alpha, act_rules=tuple(args.act_rules), keep=tuple(args.keep),
                             recipe_file=args.recipe_file, embeddings=embeddings, calib_text=args.calib_text,
                             calib_samples=args.calib_samples, calib_length=args.calib_length,
                             sensitivity_sentences=args.sensitivity_sentences, kv_cache=args.kv_cache,
                             force=args.force)
    _print(export_onnx(opts, progress=not args.json), args.json)


def _print(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    counts: dict[str, int] = {}
    for how in summary["lowering"].values():
        counts[how] = counts.get(how, 0) + 1
    lowered = ", ".join(f"{n} {how}" for how, n in sorted(counts.items())) or "nothing quantized"
    graph = ", KV cache" if summary.get("kv_cache") else ""
    smoothed = f"; {len(summary['smoothed'])} inputs smoothed" if summary.get("smoothed") else ""
    print(f"wrote {summary['path']} ({summary['bytes'] / 1e6:.2f} MB, {summary['mode']}, opset {summary['opset']}"
          f"{graph}): {lowered}{smoothed}")
