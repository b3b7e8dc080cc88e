"""``lowbit analyze`` (per-layer sensitivity) and ``lowbit compare`` (every option on one page)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

ANALYZE_EXAMPLES = """examples:
  lowbit analyze                                  # the built-in SmolLM2: int2..int8 g128 asym, keep
  lowbit analyze --candidates int3:g128:asym,int4:g128:asym,nvfp4,fp8_e4m3:channel
  lowbit analyze --format gguf                    # GGUF block types Q2_K..Q8_0 as candidates
  lowbit quantize --target-bpw 3.5                # uses (and caches) this analysis to mix precisions
"""

COMPARE_EXAMPLES = """examples:
  lowbit compare --schemes W8A16,W4A16,W3A16 --formats gguf:Q4_K_M --presets edge,mobile --target-bpw 3.5
  lowbit compare --schemes W4A16,NVFP4 --methods rtn,gptq --out out/cmp    # rerun resumes finished rows
"""


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def _add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-text", help="calibration text (default: pydoc topics after the evaluation windows)")
    p.add_argument("--calib-samples", type=int, default=16, help="windows for the Hessian/Fisher statistics (default 16)")
    p.add_argument("--kld-windows", type=int, default=2, help="of those, windows the true KLD is measured on (default 2)")
    p.add_argument("--kld-length", type=int, default=256, help="tokens per KLD window (default 256)")


def add_analysis_parsers(sub: Any) -> None:
    """Register ``analyze`` and ``compare`` on the CLI's subparsers."""
    a = sub.add_parser("analyze", help="per-layer sensitivity: measured KLD and cheap proxies for candidate precisions",
                       epilog=ANALYZE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("model", nargs="?", help="HF folder, .gguf file, or built-in 'smollm2' (default)")
    a.add_argument("--candidates", help="comma-separated specs (or GGUF types with --format gguf); 'keep' = float")
    a.add_argument("--format", default="lowbit", help="lowbit (default), hf, gptq, awq, onnx or gguf: which "
                   "candidates the output can hold")
    a.add_argument("--group-size", type=int, help="group size of the default candidates (default 128)")
    sym = a.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", default=None)
    sym.add_argument("--asym", dest="symmetric", action="store_false")
    _add_calibration(a)
    a.add_argument("--no-blocks", action="store_true", help="skip the per-block measurements")
    a.add_argument("--no-cache", action="store_true", help="measure again even if a cached result exists")
    a.add_argument("--out", help="output folder (default out/<model>-sensitivity)")
    a.add_argument("--json", action="store_true", help="print sensitivity.json")
    a.set_defaults(handler=cmd_analyze)

    c = sub.add_parser("compare", help="every option on the same model and tokens: one HTML page with plots",
                       epilog=COMPARE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("model", nargs="?", help="HF folder, .gguf file, or built-in 'smollm2' (default)")
    c.add_argument("--schemes", help="comma-separated schemes, e.g. W8A16,W4A16,NVFP4")
    c.add_argument("--methods", default="rtn", help="comma-separated methods for every scheme (default rtn)")
    c.add_argument("--formats", help="comma-separated GGUF rows, e.g. gguf:Q4_K_M,gguf:Q3_K_M (quantized by the first "
                   "--methods entry GGUF has: rtn, imatrix or gptq; else gptq), measured in llama.cpp")
    c.add_argument("--presets", help="comma-separated presets (edge, mobile, layers)")
    c.add_argument("--target-bpw", help="comma-separated budgets (average bits per weight) for budgeted mixes")
    c.add_argument("--candidates", help="candidate precisions of the budgeted mixes (default int2..int8, keep)")
    c.add_argument("--group-size", type=int, help="group size for the schemes and default candidates")
    sym = c.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", default=None)
    sym.add_argument("--asym", dest="symmetric", action="store_false")
    c.add_argument("--text", help="evaluation text (default: pydoc topics)")
    c.add_argument("--windows", type=int, default=8, help="evaluation windows of --window-length tokens (default 8)")
    c.add_argument("--window-length", type=int, default=512)
    c.add_argument("--calib-text", help="calibration text for calibrated methods and the sensitivity analysis")
    c.add_argument("--no-sensitivity", action="store_true", help="leave the per-layer sensitivity section out")
    c.add_argument("--out", help="output folder (default out/<model>-compare)")
    c.set_defaults(handler=cmd_compare)

    b = sub.add_parser("bench", help="measured tables: 'vision' = ResNet-50 ONNX FP32/FP16/INT8 size and latency "
                       "with the digits CNN's float/INT8/W4A4/XNOR accuracy")
    b.add_argument("target", choices=("vision",))
    b.add_argument("--runs", type=int, default=20, help="timed onnxruntime runs per model (default 20)")
    b.add_argument("--threads", type=int, default=2, help="onnxruntime threads (default 2)")
    b.set_defaults(handler=cmd_bench)


def cmd_analyze(args: argparse.Namespace) -> None:
    from lowbit.analysis.sensitivity import EVAL_TOKENS, AnalyzeOptions, analyze

    fmt = args.format.lower()
    opts = AnalyzeOptions(model=args.model, candidates=_split(args.candidates), formats=(fmt,),
                          group_size=args.group_size, symmetric=args.symmetric, calib_text=args.calib_text,
                          calib_samples=args.calib_samples, kld_samples=args.kld_windows, kld_length=args.kld_length,
                          eval_tokens=EVAL_TOKENS if args.calib_text is None else 0, blocks=not args.no_blocks,
                          cache=not args.no_cache)
    if opts.kld_samples > opts.calib_samples or opts.kld_samples <= 0 or opts.kld_length < 2:
        raise LowbitError("--kld-windows must be between 1 and --calib-samples, and --kld-length at least 2")
    sens = analyze(opts, progress=not args.json)
    out = Path(args.out) if args.out else Path("out") / f"{Path(args.model).stem.lower() if args.model else 'smollm2'}-sensitivity"
    from lowbit.analysis.report import write_analysis

    write_analysis(sens, out)
    if args.json:
        print(json.dumps(sens.to_dict(), indent=1))
        return
    from lowbit.analysis.report import print_analysis

    print_analysis(sens)
    print(f"wrote {out / 'sensitivity.json'} and {out / 'sensitivity.png'}")


def cmd_compare(args: argparse.Namespace) -> None:
    from lowbit.analysis.compare import CompareOptions, build_rows, run_compare
    from lowbit.workflow import CalibrationOptions, EvalOptions, QuantizeOptions

    gguf = []
    for item in _split(args.formats):
        kind, _, value = item.partition(":")
        if kind.lower() != "gguf" or not value:
            raise LowbitError(f"--formats takes GGUF rows as gguf:TYPE (e.g. gguf:Q4_K_M), not {item!r}")
        gguf.append(value)
    try:
        budgets = tuple(float(b) for b in _split(args.target_bpw))
    except ValueError:
        raise LowbitError(f"--target-bpw takes numbers, e.g. 3.5,4.25; got {args.target_bpw!r}") from None
    rows = build_rows(_split(args.schemes), _split(args.methods) or ("rtn",), tuple(gguf), _split(args.presets), budgets,
                      args.group_size)
    base = QuantizeOptions(model=args.model, group_size=args.group_size, symmetric=args.symmetric,
                           eval=EvalOptions(text=args.text, windows=args.windows, length=args.window_length),
                           calibration=CalibrationOptions(text=args.calib_text), candidates=_split(args.candidates))
    model = Path(args.model).stem.lower() if args.model else "smollm2"
    out = Path(args.out) if args.out else Path("out") / f"{model}-compare"
    result, html, md = run_compare(CompareOptions(base=base, rows=rows, out=out, sensitivity=not args.no_sensitivity))
    from lowbit.analysis.report import print_compare

    print_compare(result)
    print(f"wrote {html} and {md}")


def cmd_bench(args: argparse.Namespace) -> None:
    import tempfile

    from lowbit.vision.table import digits_accuracies, export_resnet50, measure_latency, print_vision_table

    accuracies = digits_accuracies()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure_latency(export_resnet50(Path(tmp)), runs=args.runs, threads=args.threads)
    print_vision_table(rows, accuracies)
