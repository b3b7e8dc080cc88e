"""``lowbit analyze`` (per-layer sensitivity), ``lowbit compare`` (every option on one page) and ``lowbit bench``
(measured tables: speed and memory of LLM files in their engines, the vision table)."""

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
  lowbit compare smollm2 path/to/hf_folder --schemes W8A16,W4A16 --ray       # 4 rows as Ray tasks, a page per model
  lowbit compare --schemes W4A16,W3A16 --ray-address HEAD:6379  # a Ray cluster; paths on a shared filesystem
"""


BENCH_EXAMPLES = """examples:
  lowbit bench llm out/smollm2-Q4_K_M-gptq.gguf out/smollm2-Q8_0-gptq.gguf   # beside an F16 GGUF, llama.cpp
  lowbit bench llm out/w4-onnx --original smollm2      # int4 MatMulNBits KV graph beside the fp32 graph
  lowbit bench llm out/w4 --prompt-tokens 128 --new-tokens 32 --runs 5 --threads 4
  lowbit bench vision --runs 20
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
    c.add_argument("models", nargs="*", metavar="MODEL",
                   help="HF folder, .gguf file, or built-in 'smollm2' (default); several models make a batch: every "
                        "(model, row) is one task, and each model gets its own page under --out/<model>")
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
    c.add_argument("--out", help="output folder (default out/<model>-compare; with several models, one "
                   "subfolder per model)")
    c.add_argument("--ray", action="store_true", help="measure the rows as Ray tasks, side by side, on a local Ray "
                   "instance (pip install 'lowbit[ray]'); a task whose worker dies is rerun, finished rows are kept")
    c.add_argument("--ray-address", metavar="ADDR", help="run the Ray tasks on the cluster at ADDR (HOST:6379 or "
                   "ray://HOST:10001; implies --ray); every node needs lowbit and the model and --out paths")
    c.set_defaults(handler=cmd_compare)

    b = sub.add_parser("bench", help="measured tables: 'llm' = speed and memory of quantized files in their engines "
                       "beside the original; 'vision' = ResNet-50 ONNX and the digits CNN",
                       epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    targets = b.add_subparsers(dest="target", required=True, metavar="{llm,vision}")
    v = targets.add_parser("vision", help="ResNet-50 ONNX FP32/FP16/INT8 size and latency with the digits CNN's "
                           "float/INT8/W4A4/XNOR accuracy")
    v.add_argument("--runs", type=int, default=20, help="timed onnxruntime runs per model (default 20)")
    v.add_argument("--threads", type=int, default=2, help="onnxruntime threads (default 2)")
    v.set_defaults(handler=cmd_bench)
    m = targets.add_parser("llm", help="prompt and decode tokens/s, time to first token, peak memory and size of "
                           "GGUF (llama.cpp), ONNX (onnxruntime, KV cache) and model folders (transformers), "
                           "each beside the unquantized original", epilog=BENCH_EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("files", nargs="+", metavar="MODEL_OR_FILE",
                   help=".gguf files, .onnx KV-cache graphs (or folders with model.onnx), lowbit or Hugging Face "
                        "folders, or a built-in model name")
    m.add_argument("--original", help="the float model the files were made from (default: what their files name, "
                                      "else the built-in smollm2)")
    m.add_argument("--prompt-tokens", type=int, default=512, help="tokens in the prompt (default 512)")
    m.add_argument("--new-tokens", type=int, default=64, help="greedy decode steps (default 64)")
    m.add_argument("--runs", type=int, default=3, help="timed runs per file; the median is reported (default 3)")
    m.add_argument("--threads", type=int, default=2, help="engine threads (default 2)")
    m.add_argument("--keep-originals", metavar="DIR", help="write the originals (F16 GGUF, fp32 ONNX) here and "
                                                           "keep them (default: a temporary folder)")
    m.add_argument("--json", action="store_true", help="print the result as JSON")
    m.set_defaults(handler=cmd_bench_llm)


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
    from lowbit.analysis.compare import CompareOptions, build_rows, run_compare_batch
    from lowbit.analysis.sweep import SweepOptions

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
    models = args.models or [None]
    sweep = SweepOptions(ray=args.ray or args.ray_address is not None, address=args.ray_address)
    if sweep.ray:
        from lowbit.analysis.sweep import import_ray

        import_ray()  # a missing Ray is said before any work
    batch = tuple(CompareOptions(base=_compare_base(args, model), rows=rows, out=out,
                                 sensitivity=not args.no_sensitivity)
                  for model, out in zip(models, _compare_outs(models, args.out)))
    from lowbit.analysis.report import print_compare

    for result, html, md in run_compare_batch(batch, sweep=sweep):
        print_compare(result)
        print(f"wrote {html} and {md}")


def _compare_base(args: argparse.Namespace, model: str | None) -> Any:
    """The quantize options every row of one model's compare shares."""
    from lowbit.workflow import CalibrationOptions, EvalOptions, QuantizeOptions

    return QuantizeOptions(model=model, group_size=args.group_size, symmetric=args.symmetric,
                           eval=EvalOptions(text=args.text, windows=args.windows, length=args.window_length),
                           calibration=CalibrationOptions(text=args.calib_text), candidates=_split(args.candidates))


def _compare_outs(models: list[str | None], out: str | None) -> list[Path]:
    """One output folder per model: --out itself for one model, --out/<model> for several; out/<model>-compare
    without --out."""
    names = [Path(m).stem.lower() if m else "smollm2" for m in models]
    if len(set(names)) != len(names):
        raise LowbitError(f"two models of the batch are both named {next(n for n in names if names.count(n) > 1)!r}; "
                          "compare them in separate runs with their own --out")
    if out and len(models) == 1:
        return [Path(out)]
    return [Path(out) / name if out else Path("out") / f"{name}-compare" for name in names]


def cmd_bench(args: argparse.Namespace) -> None:
    import tempfile

    from lowbit.vision.table import digits_accuracies, export_resnet50, measure_latency, print_vision_table

    accuracies = digits_accuracies()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure_latency(export_resnet50(Path(tmp)), runs=args.runs, threads=args.threads)
    print_vision_table(rows, accuracies)


def cmd_bench_llm(args: argparse.Namespace) -> None:
    from lowbit.eval.speed import SpeedOptions
    from lowbit.workflow_bench import BenchLLMOptions, bench_llm

    speed = SpeedOptions(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs,
                         threads=args.threads)
    result = bench_llm(BenchLLMOptions(tuple(args.files), args.original, speed, args.keep_originals),
                       progress=not args.json)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print_speed_table(result)


SPEED_COLUMNS = ("model", "engine", "size MB", "prompt tok/s", "decode tok/s", "TTFT ms", "peak RSS MB")


def print_speed_table(result: dict[str, Any]) -> None:
    """The rows as a rich table: each figure with its ratio to the same engine's original."""
    from rich.console import Console
    from rich.table import Table

    o = result["options"]
    table = Table(title=f"speed and memory vs {Path(result['original']).name} ({o['prompt_tokens']}-token prompt, "
                        f"{o['new_tokens']} decode steps, {o['threads']} threads, median of {o['runs']})")
    for i, name in enumerate(SPEED_COLUMNS):
        table.add_column(name, justify="left" if i < 2 else "right")
    for row in result["rows"]:
        r = row["ratios"]
        table.add_row(row["label"], row["engine"], f"{row['bytes'] / 1e6:.1f} ({r['bytes']:.2f}x)",
                      f"{row['prompt_tps']:.1f} ({r['prompt_tps']:.2f}x)",
                      f"{row['decode_tps']:.1f} ({r['decode_tps']:.2f}x)",
                      f"{row['ttft_s'] * 1e3:.1f} ({r['ttft_s']:.2f}x)",
                      f"{row['peak_rss_bytes'] / 2**20:.0f} ({r['peak_rss_bytes']:.2f}x)")
    console = Console()
    console.print(table)
    console.print("[dim]ratios: divided by the same engine's original (F16 GGUF in llama.cpp, fp32 graph in "
                  "onnxruntime, the float model in transformers); each file timed in its own process; peak RSS "
                  "of that process.[/dim]")
