"""``lowbit export gguf``: write a GGUF file llama.cpp loads (types, named mixes, imatrix, error feedback)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from lowbit.cli_export_hf import add_hf_targets
from lowbit.cli_export_onnx import add_onnx_target
from lowbit.errors import LowbitError
from lowbit.export.gguf import METHODS, GGUFExportOptions, default_out
from lowbit.gguf.mixes import MIXES, get_mix

EXAMPLES = """examples:
  lowbit export gguf --type Q4_K_M                       # the built-in SmolLM2, imatrix + error feedback
  lowbit export gguf path/to/hf_folder --type Q8_0 --method rtn --out model-q8.gguf
  lowbit export gguf --type Q3_K_M --imatrix smollm2.imatrix   # writes the imatrix, or reads it if it exists
  lowbit export gguf --type Q4_0 --eval                  # also measure it in llama.cpp against the float model
"""


def add_export_parser(sub: Any) -> None:
    """Register ``export`` (with its ``gguf`` target) on the CLI's subparsers."""
    e = sub.add_parser("export", help="write a model in another engine's format (gguf, hf, gptq, awq, onnx)")
    targets = e.add_subparsers(dest="target", required=True)
    g = targets.add_parser("gguf", help="write a GGUF v3 file for llama.cpp", epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("model", nargs="?", help="HF folder, .gguf file, built-in 'smollm2' (default), or a lowbit output "
                   "folder whose grids match the type (TQ2_0, TQ1_0, Q4_0, Q8_0: written as is, e.g. after lowbit qat)")
    g.add_argument("--type", default="Q4_K_M", help=f"{', '.join(MIXES)} (default Q4_K_M)")
    g.add_argument("--method", default="gptq", choices=METHODS,
                   help="rtn: llama.cpp's reference rounding; imatrix: importance-weighted scale search; "
                        "gptq: that plus error feedback (default)")
    g.add_argument("--imatrix", metavar="FILE", help="llama.cpp imatrix.dat: read if it exists, else written")
    g.add_argument("--calib-text", help="calibration text file (default: pydoc topics after the eval windows)")
    g.add_argument("--calib-samples", type=int, default=32, help="calibration windows of 512 tokens (default 32)")
    g.add_argument("--out", help="output file (default out/<model>-<type>-<method>.gguf)")
    g.add_argument("--force", action="store_true", help="replace an existing output file")
    g.add_argument("--eval", action="store_true", help="evaluate the file in llama.cpp against the float model")
    g.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens (default 8)")
    g.add_argument("--json", action="store_true", help="print the summary as JSON")
    target = g.add_mutually_exclusive_group()
    target.add_argument("--target-bpw", type=float, metavar="B", help="choose each tensor's type under B bits per "
                        "weight (sensitivity analysis, cached); the plan is saved as <out>.recipe.yaml")
    target.add_argument("--target-size", metavar="SIZE", help="as --target-bpw, for a file size (e.g. 80MB)")
    g.add_argument("--candidates", help="GGUF types to choose from (default Q2_K..Q8_0, F16)")
    g.add_argument("--recipe", help="a <file>.recipe.yaml written by a budgeted export: the same per-tensor types")
    g.set_defaults(handler=cmd_export_gguf)
    add_hf_targets(targets)
    add_onnx_target(targets)


def cmd_export_gguf(args: argparse.Namespace) -> None:
    from lowbit.export.gguf import export_gguf, export_gguf_checkpoint, is_lowbit_checkpoint
    from lowbit.model.load import load_model

    opts = GGUFExportOptions(model=args.model, type=args.type, out=args.out, method=args.method,
                             imatrix=args.imatrix, calib_text=args.calib_text, calib_samples=args.calib_samples,
                             eval_tokens=args.windows * 512, force=args.force)
    budget = _budget(args)
    if is_lowbit_checkpoint(args.model):
        if budget is not None or getattr(args, "recipe", None):
            raise LowbitError("a lowbit checkpoint is written with the types its grids already have; "
                              "--target-*/--recipe apply to an original model")
        return _print_export(export_gguf_checkpoint(args.model, opts, progress=not args.json), args, None)
    if budget is not None and getattr(args, "recipe", None):
        raise LowbitError("--target-bpw/--target-size choose the types themselves; drop --recipe")
    if getattr(args, "recipe", None):
        from lowbit.analysis.gguf_budget import types_from_recipe

        base, types = types_from_recipe(args.recipe)
        opts = replace(opts, type=base or opts.type, types=types)
    loaded = load_model(args.model)
    recipe = None
    if budget is not None:
        from lowbit.analysis.gguf_budget import plan_gguf, plan_recipe

        candidates = tuple(c.strip() for c in (args.candidates or "").split(",") if c.strip())
        plan = plan_gguf(loaded, opts, budget, candidates, progress=not args.json)
        if args.out is None:
            opts = replace(opts, out=str(default_out(opts, get_mix(opts.type)).with_name(
                f"{Path(opts.model).stem.lower() if opts.model else 'smollm2'}-gguf-{budget.label().replace(' ', '')}"
                f"-{opts.method}.gguf")))
        opts = replace(opts, types=plan.types)
        recipe = plan_recipe(plan, opts, budget)
    summary = export_gguf(opts, progress=not args.json, loaded=loaded)
    if recipe is not None:
        from lowbit.analysis.gguf_budget import save_plan_recipe

        summary["recipe"] = str(save_plan_recipe(recipe, summary["path"]))
        summary["allocation"] = recipe.options["allocation"]
    _print_export(summary, args, loaded)


def _print_export(summary: dict[str, Any], args: argparse.Namespace, loaded: Any) -> None:
    """Evaluate in llama.cpp if asked (against the original) and print the summary."""
    if args.eval:
        if loaded is None:
            from lowbit.model.checkpoint import read_manifest
            from lowbit.model.load import load_model

            loaded = load_model(read_manifest(Path(args.model))["source"])
        reference = _reference(loaded, args.windows)
        del loaded  # llama.cpp runs the file now: the float model's memory is not needed beside it
        summary["eval"] = _evaluate(summary["path"], reference)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    types = ", ".join(f"{k} x{v}" for k, v in sorted(summary["tensor_types"].items()))
    print(f"wrote {summary['path']} ({summary['bytes'] / 1e6:.2f} MB, {summary['type']}, {summary['method']}): {types}")
    if summary["fallbacks"]:
        print(f"  {len(summary['fallbacks'])} tensors fell back (row length): "
              + ", ".join(sorted(set(summary["fallbacks"].values()))))
    if "allocation" in summary:
        a = summary["allocation"]
        print(f"  budgeted ({a['target']}): {a['bits_per_weight']:.3f} bpw over {a['items']} tensors, predicted KLD "
              f"{a['predicted_kld']:.4f}; plan in {summary['recipe']}")
    if "eval" in summary:
        m = summary["eval"]
        print(f"  llama.cpp: PPL {m['ppl']:.3f} (float {m['ppl_base']:.3f}), KLD {m['kld']:.4f}, top-1 {m['top1']:.4f}")


def _budget(args: argparse.Namespace):
    """The size budget of a budgeted GGUF export (None: the named mix decides every type)."""
    bpw, size = getattr(args, "target_bpw", None), getattr(args, "target_size", None)
    if bpw is None and size is None:
        return None
    from lowbit.analysis.budget import Budget, parse_size

    return Budget(bpw, parse_size(size) if size else None)


def _reference(loaded: Any, n_windows: int) -> Any:
    """The float model's log-probabilities on the evaluation windows (kept on disk, see lowbit.eval.lm)."""
    from lowbit.data.text import eval_windows, load_text, tokenize
    from lowbit.eval.lm import lm_reference

    windows = eval_windows(tokenize(loaded.tokenizer, load_text(None)), n_windows, 512).ids
    return lm_reference(loaded.model, windows, progress=False)


def _evaluate(path: str, reference: Any) -> dict[str, float]:
    """PPL / KLD / top-1 of the GGUF file in llama.cpp against the float model's reference."""
    from lowbit.eval.llamacpp import compare_logprobs, iter_gguf_logprobs

    return compare_logprobs(reference.logprobs, iter_gguf_logprobs(path, reference.windows), reference.windows)
