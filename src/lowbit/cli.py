"""``lowbit`` command line: quantize | eval | inspect. User errors are one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lowbit import __version__
from lowbit.cli_ab import add_ab_parsers
from lowbit.cli_analysis import add_analysis_parsers
from lowbit.cli_export import add_export_parser
from lowbit.cli_train import add_train_parsers
from lowbit.errors import LowbitError
from lowbit.memory import give_large_blocks_back

EPILOG = """examples:
  lowbit quantize                                   # W4A16 g128 on the built-in SmolLM2-135M
  lowbit quantize --scheme W8A16 --out out/w8
  lowbit quantize minilm --scheme W8A16             # the built-in all-MiniLM-L6-v2 encoder
  lowbit quantize path/to/hf_folder --scheme W4A16 --group-size 64 --asym --search mse
  lowbit quantize --rule '*.down_proj=int8:channel' --ignore 're:.*layers\\.0\\..*'
  lowbit quantize --scheme W4A16 --asym --method gptq --act-order      # calibrated (128 x 512 tokens)
  lowbit quantize --scheme W3A16 --asym --method awq+gptq --calib-text my.jsonl
  lowbit quantize --method gptq --out out/g --resume  # continue a killed run from its last finished block
  lowbit eval out/smollm2-w4a16 --text my.txt --json
  lowbit quantize --format gguf --type Q4_K_M         # llama.cpp file: imatrix + error feedback, measured in llama.cpp
  lowbit quantize --method gptq --format lowbit,onnx  # also out/...-onnx/model.onnx (int4 as MatMulNBits)
  lowbit quantize --target-bpw 3.5                   # per-layer precisions chosen by measured sensitivity
  lowbit quantize --format gguf --target-size 80MB   # per-tensor GGUF types under a file size
  lowbit quantize --preset edge                      # attention 16-bit, FFN 8-bit grouped, head full precision
  lowbit analyze                                     # which layers are sensitive (KLD per linear and block)
  lowbit compare --schemes W8A16,W4A16 --formats gguf:Q4_K_M --presets edge --target-bpw 3.5
  lowbit inspect model.gguf
"""


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", help="evaluation text: plain text or .jsonl with a 'text' field (default: pydoc topics)")
    p.add_argument("--windows", type=int, default=8, help="LM evaluation windows (default 8)")
    p.add_argument("--window-length", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--sentences", type=int, default=256, help="encoder: paragraphs to embed (default 256)")
    p.add_argument("--reference-store", choices=("fp32", "fp16"), default="fp32",
                   help="how the original's log-probabilities are kept on disk while comparing: fp32 (exact, "
                        "default) or fp16 (half the disk; mean KLD moves < 0.1%%, bench/RESULTS_eval.md)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="lowbit", description="Quantize neural networks and measure what it cost.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command")

    q = sub.add_parser("quantize", help="quantize a model, write it, and measure it against the original")
    q.add_argument("model", nargs="?", help="HF folder, .gguf file, or built-in 'smollm2' (default) / 'minilm'")
    q.add_argument("--scheme", default="W4A16", help="W16A16, FP16, BF16, W8A16, W4A16 (default), W3A16, W2A16, FP8, FP8_E5M2, NVFP4, MXFP4, "
                   "MXFP8, FP4, NF4, LOG2, TERNARY, BINARY")
    q.add_argument("--method", help="rtn (default), hqq, gptq, awq, awq+gptq, smoothquant, smoothquant+gptq; "
                   "for --format gguf: rtn, imatrix, gptq (default)")
    q.add_argument("--format", default="lowbit", metavar="FMT[,FMT]",
                   help="lowbit (default: safetensors folder + report), gguf (llama.cpp file, see --type), "
                        "hf (compressed-tensors: vLLM, transformers), gptq (GPTQ checkpoint), awq (AutoAWQ GEMM "
                        "checkpoint), onnx (onnxruntime: int4 as MatMulNBits); comma-separated for several; hf, gptq, "
                        "awq and onnx are written beside the lowbit folder as <out>-hf, <out>-gptq, <out>-awq, "
                        "<out>-onnx")
    q.add_argument("--type", default="Q4_K_M", help="GGUF type or llama.cpp mix for --format gguf (default Q4_K_M)")
    q.add_argument("--group-size", type=int, help="quantize in groups of N along the input dimension")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--asym", dest="symmetric", action="store_false", default=None, help="unsigned codes with a zero point")
    sym.add_argument("--sym", dest="symmetric", action="store_true", help="signed codes, no zero point")
    q.add_argument("--search", choices=("minmax", "mse"), help="scale search (default minmax; mse for gptq)")
    q.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="dtype of tensors kept in float")
    q.add_argument("--act", metavar="SPEC", help="activation quantization, e.g. int8:token:dynamic, "
                   "int8:tensor:static:kl (observers: minmax, percentile, mse, kl)")
    q.add_argument("--rule", action="append", default=[], metavar="PATTERN=SPEC",
                   help="give matching modules SPEC (or 'keep'); first match wins; repeatable")
    q.add_argument("--ignore", action="append", default=[], metavar="PATTERN", help="keep matching modules in float")
    q.add_argument("--embeddings", metavar="int8|int4|keep|SPEC",
                   help="token embedding: int8 (per row), int4 (groups of 32), keep, or a spec (default: int8 when "
                        "it is over 20%% of the weights, else keep; GGUF mixes choose as llama.cpp does)")
    q.add_argument("--lm-head", metavar="int8|int4|keep|SPEC",
                   help="untied output head, as --embeddings (default keep; a tied head is the embedding)")
    q.add_argument("--recipe", help="YAML recipe file (rules, ignore, scheme, method)")
    q.add_argument("--preset", help="a named layer strategy: layers, edge, mobile (see lowbit.presets)")
    b = q.add_argument_group("budgeted mixed precision (sensitivity analysis, cached)")
    target = b.add_mutually_exclusive_group()
    target.add_argument("--target-bpw", type=float, metavar="B", help="choose each layer's precision to minimize "
                        "predicted KLD at B average bits per weight (over the allocated weights)")
    target.add_argument("--target-size", metavar="SIZE", help="as --target-bpw, for a total size (e.g. 90MB): the "
                        "weights file, or the GGUF file")
    b.add_argument("--candidates", help="comma-separated precisions to choose from (default int2..int6 in groups of 128/64/32, "
                   "int8 per channel, keep; GGUF: Q2_K..Q8_0, F16)")
    q.add_argument("--out", help="output folder (default out/<model>-<scheme>...)")
    q.add_argument("--force", action="store_true", help="replace an existing output folder")
    q.add_argument("--resume", action="store_true",
                   help="calibrated methods: continue a killed run from its last finished block, saved in "
                        "<out>.calib-state (the same command otherwise; the output is byte-identical to an "
                        "uninterrupted run's; refused if the model, calibration data or recipe changed). Without "
                        "--resume a run starts over and replaces that folder; a finished run removes it")
    q.add_argument("--no-eval", action="store_true", help="skip the evaluation against the original")
    q.add_argument("--stream", action="store_true", help="read a HF folder (sharded or not) one block at a time and "
                   "write the output block by block, in shards (bounded memory; no evaluation, run 'lowbit eval DIR' "
                   "afterwards)")
    q.add_argument("--max-memory", metavar="SIZE", help="refuse a run whose memory estimate (printed before every "
                   "run) exceeds SIZE, e.g. 4GB or 800MB")
    q.add_argument("--json", action="store_true", help="print report.json instead of a table")
    _add_eval_args(q)
    c = q.add_argument_group("calibration (gptq, awq, smoothquant)")
    c.add_argument("--calib-text", help="calibration text: plain text or .jsonl (default: pydoc topics after the eval part)")
    c.add_argument("--calib-samples", type=int, help="calibration samples (default 128; 32 for --format gguf)")
    c.add_argument("--calib-length", type=int, default=512, help="tokens per calibration sample (default 512)")
    c.add_argument("--calib-batch", type=int, default=8, help="samples per forward pass (default 8)")
    c.add_argument("--calib-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="precision of the calibration forward passes (auto: bf16 where the CPU has bf16 units)")
    c.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: visit columns by descending Hessian diagonal (default: on)")
    c.add_argument("--static-groups", action="store_true", help="GPTQ: group scales from the original weights")
    c.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: quantize each block in one pass, later linears seeing earlier ones quantized "
                        "(default: on; off: a float observing pass, then a quantized one)")
    c.add_argument("--damp", type=float, help="GPTQ: dampening as a fraction of mean diag(H) (default 0.01)")
    c.add_argument("--awq-grid", type=int, help="AWQ: exponents tried in [0, 1) (default 20)")
    c.add_argument("--alpha", type=float, help="SmoothQuant: migration strength (default 0.5)")

    e = sub.add_parser("eval", help="re-evaluate a lowbit output folder against its original")
    e.add_argument("checkpoint", help="a folder written by lowbit quantize")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_eval_args(e)

    i = sub.add_parser("inspect", help="summarize a GGUF file, safetensors file/folder, or lowbit output")
    i.add_argument("path")
    i.add_argument("--all", action="store_true", help="list every tensor")
    i.add_argument("--json", action="store_true", help="print JSON")
    add_export_parser(sub)
    add_analysis_parsers(sub)
    add_ab_parsers(sub)
    add_train_parsers(sub)
    return parser


def _eval_options(args: argparse.Namespace):
    from lowbit.workflow import EvalOptions

    return EvalOptions(text=args.text, windows=args.windows, length=args.window_length, sentences=args.sentences,
                       reference_store=args.reference_store)


# Formats written from lowbit's own output folder, beside it as <folder>-<format>: the exporter's module and
# its function (folder, target, force=...) -> summary. Imported only when asked for (onnx is optional).
DERIVED_FORMATS = {
    "hf": ("lowbit.export.compressed_tensors", "export_hf"),
    "gptq": ("lowbit.export.gptq", "export_gptq_folder"),
    "awq": ("lowbit.export.awq", "export_awq_folder"),
    "onnx": ("lowbit.export.onnx_checkpoint", "export_onnx_folder"),
}
OUTPUT_FORMATS = ("lowbit", "gguf", *DERIVED_FORMATS)


def _export_derived(name: str, folder: Path, force: bool) -> dict[str, Any]:
    """Write format ``name`` from the lowbit folder ``folder`` into ``<folder>-<name>``."""
    import importlib

    module, function = DERIVED_FORMATS[name]
    export = getattr(importlib.import_module(module), function)
    return export(folder, folder.with_name(f"{folder.name}-{name}"), force=force)


def cmd_quantize(args: argparse.Namespace) -> None:
    formats = [f.strip().lower() for f in args.format.split(",") if f.strip()]
    unknown = [f for f in formats if f not in OUTPUT_FORMATS]
    if unknown or not formats:
        raise LowbitError(f"unknown output format {', '.join(unknown) or repr(args.format)}; "
                          f"choose from {', '.join(OUTPUT_FORMATS)}")
    derived = [f for f in formats if f in DERIVED_FORMATS]
    if args.resume and "gguf" in formats:
        raise LowbitError("--resume continues lowbit's block-by-block calibration; --format gguf quantizes on its "
                          "own path and cannot resume: drop --resume or the gguf format")
    if "gguf" in formats:
        _quantize_gguf(args, several=len(formats) > 1)
    if "lowbit" in formats or derived:
        out_dir = _quantize_lowbit(args)
        for name in derived:
            summary = _export_derived(name, out_dir, args.force)
            if not args.json:
                print(f"wrote {summary['path']} ({summary['format']})")


def _quantize_gguf(args: argparse.Namespace, several: bool) -> None:
    """``--format gguf``: the GGUF exporter (llama.cpp block types), measured in llama.cpp when it is installed."""
    from lowbit.cli_export import cmd_export_gguf
    from lowbit.export.gguf import METHODS as GGUF_METHODS

    method = args.method or "gptq"
    if method not in GGUF_METHODS:
        raise LowbitError(f"--format gguf quantizes with --method {', '.join(GGUF_METHODS)}, not {method!r}")
    gguf_args = argparse.Namespace(
        model=args.model, type=args.type, method=method, imatrix=None, calib_text=args.calib_text,
        calib_samples=32 if args.calib_samples is None else args.calib_samples,
        out=None if several else args.out, force=args.force, eval=not args.no_eval and _has_llama_cpp(),
        windows=args.windows, json=args.json, target_bpw=args.target_bpw, target_size=args.target_size,
        candidates=args.candidates, recipe=args.recipe)
    cmd_export_gguf(gguf_args)


def _has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _quantize_lowbit(args: argparse.Namespace) -> Path:
    from lowbit.report import print_report
    from lowbit.workflow import CalibrationOptions, QuantizeOptions, quantize_job

    samples = 128 if args.calib_samples is None else args.calib_samples
    if samples <= 0 or args.calib_length < 2 or args.calib_batch <= 0:
        raise LowbitError("--calib-samples and --calib-batch must be positive and --calib-length at least 2")
    method_options = {"act_order": args.act_order, "static_groups": args.static_groups or None,
                      "true_sequential": args.true_sequential, "damp": args.damp, "grid": args.awq_grid,
                      "alpha": args.alpha}
    opts = QuantizeOptions(
        model=args.model, scheme=args.scheme, method=args.method or "rtn", group_size=args.group_size,
        symmetric=args.symmetric, scale_search=args.search, dtype=args.dtype, rules=tuple(args.rule),
        ignore=tuple(args.ignore), recipe_file=args.recipe, out=args.out, force=args.force,
        evaluate=not args.no_eval, eval=_eval_options(args),
        calibration=CalibrationOptions(args.calib_text, samples, args.calib_length, args.calib_batch,
                                       dtype=args.calib_dtype),
        method_options=tuple((k, v) for k, v in method_options.items() if v is not None),
        activations=args.act,
        stream=args.stream,
        embeddings=args.embeddings,
        lm_head=args.lm_head,
        target_bpw=args.target_bpw,
        target_size=args.target_size,
        candidates=tuple(c.strip() for c in (args.candidates or "").split(",") if c.strip()),
        formats=tuple(f.strip().lower() for f in args.format.split(",") if f.strip() and f.strip().lower() != "gguf"),
        preset=args.preset,
        resume=args.resume,
        max_memory=args.max_memory,
    )
    report, out_dir = quantize_job(opts, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
        print(f"wrote {out_dir}")
    return out_dir


def cmd_eval(args: argparse.Namespace) -> None:
    from lowbit.report import print_report
    from lowbit.workflow import eval_job

    report = eval_job(args.checkpoint, _eval_options(args), progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report({**report, "source_bytes": None})


def cmd_inspect(args: argparse.Namespace) -> None:
    from lowbit.inspect_files import inspect_path

    summary = inspect_path(args.path)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return
    _print_inspect(summary, args.all)


def _print_inspect(summary: dict[str, Any], show_all: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{summary['path']}[/bold] ({summary['kind']}, {summary['file_bytes'] / 1e6:.1f} MB on disk)")
    for key, value in summary.get("metadata", {}).items():
        console.print(f"  {key} = {value}")
    table = Table(title="by type")
    for col in ("type", "tensors", "elements", "MB", "bits/weight"):
        table.add_column(col, justify="left" if col == "type" else "right")
    for name, agg in sorted(summary["by_type"].items(), key=lambda kv: -kv[1]["elements"]):
        table.add_row(name, str(agg["tensors"]), f"{agg['elements']:,}", f"{agg['bytes'] / 1e6:.2f}",
                      f"{8 * agg['bytes'] / max(agg['elements'], 1):.3f}")
    table.add_row("total", str(len(summary["tensors"])), f"{summary['elements']:,}",
                  f"{summary['tensor_bytes'] / 1e6:.2f}", f"{summary['bits_per_weight']:.3f}")
    console.print(table)
    if show_all:
        rows = Table(title="tensors")
        for col in ("name", "type", "shape", "bits/weight"):
            rows.add_column(col)
        for t in summary["tensors"]:
            rows.add_row(t["name"], t["type"], str(t["shape"]), f"{8 * t['bytes'] / max(t['elements'], 1):.3f}")
        console.print(rows)


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "inspect": cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lowbit`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    give_large_blocks_back()  # this process's allocator policy: freed large tensors go back to the OS
    try:
        (getattr(args, "handler", None) or COMMANDS[args.command])(args)
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
