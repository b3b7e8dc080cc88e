"""``lowbit generate`` (generation quality of a quantized model against its original) and ``lowbit ab``
(``page``: the side-by-side A/B page of a generation result; ``tally``: the votes people saved on it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lowbit.errors import LowbitError

GENERATE_EXAMPLES = """examples:
  lowbit generate out/smollm2-w4a16                  # 32 built-in prompts x 48 tokens; writes generation.json inside
  lowbit generate out/smollm2-Q4_K_M-gptq.gguf       # the GGUF in llama.cpp, the original in transformers
  lowbit generate out/q4km.gguf --original out/f16.gguf --original-engine llama.cpp   # both in llama.cpp
  lowbit generate out/w4-onnx --prompts my.jsonl --new-tokens 64 --original smollm2
  lowbit ab page out/smollm2-w4a16/generation.json   # blind A/B page + its key beside it
"""

AB_EXAMPLES = """examples:
  lowbit ab page out/w4/generation.json --out out/w4/ab.html   # blind: sides shuffled, key in ab.key.json
  lowbit ab page out/w4/generation.json --labelled             # original always on side A, named
  lowbit ab tally votes.json --key out/w4/ab.key.json          # preference rate and binomial test
"""


def add_ab_parsers(sub: Any) -> None:
    """Register ``generate`` and ``ab`` (with ``page`` and ``tally``) on the CLI's subparsers."""
    from lowbit.eval.prompts import DEFAULT_NEW_TOKENS, DEFAULT_PROMPTS

    g = sub.add_parser("generate", help="greedy continuations from the original and a quantized model (in the "
                       "engine its file is for): BLEU, chrF, ROUGE-L, exact match, tokens to the first divergence",
                       epilog=GENERATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("model", help="the quantized model: a lowbit output folder, a Hugging Face folder "
                   "(compressed-tensors), a .gguf file (llama.cpp) or an .onnx file / folder with model.onnx")
    g.add_argument("--original", help="the float model to compare with (default: the source the folder names, "
                   "else the built-in 'smollm2')")
    g.add_argument("--original-engine", choices=("transformers", "llama.cpp"), default="transformers",
                   help="where the original runs (default transformers); llama.cpp takes a GGUF original (e.g. "
                   "its F16 file), so that a GGUF model is judged in the same engine as its original")
    g.add_argument("--reuse-original", metavar="GENERATION.json", help="take the original's continuations from an "
                   "earlier result on the same prompts (checked) instead of generating them again")
    g.add_argument("--prompts", metavar="FILE.jsonl", help="one JSON object per line with a \"prompt\" (or \"text\") "
                   "field (default: sentence starts from the pydoc topics after the evaluation windows)")
    g.add_argument("--n-prompts", type=int, help=f"how many prompts (default {DEFAULT_PROMPTS} built-in, "
                   "every line of --prompts)")
    g.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS,
                   help=f"tokens generated per prompt (default {DEFAULT_NEW_TOKENS})")
    g.add_argument("--threads", type=int, help="llama.cpp / onnxruntime threads (default: up to 2)")
    g.add_argument("--out", help="result JSON (default: generation.json inside the folder, <name>.generation.json "
                   "beside a file)")
    g.add_argument("--json", action="store_true", help="print the result JSON instead of a table")
    g.set_defaults(handler=cmd_generate)

    ab = sub.add_parser("ab", help="A/B by people: a side-by-side page of a generation result, and the tally of "
                        "the votes saved on it", epilog=AB_EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ab_sub = ab.add_subparsers(dest="ab_command", required=True)
    p = ab_sub.add_parser("page", help="write the self-contained HTML page (and, beside it, the key)")
    p.add_argument("generation", help="a generation.json written by 'lowbit generate'")
    p.add_argument("--out", help="the page (default: ab.html beside the generation JSON); the key goes to "
                   "<name>.key.json beside it")
    p.add_argument("--labelled", action="store_true", help="not blind: the original always on side A, both named")
    p.add_argument("--seed", type=int, default=0, help="seed of the blind shuffle (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing page and key")
    p.set_defaults(handler=cmd_ab_page)
    t = ab_sub.add_parser("tally", help="preference rate of the quantized model with a two-sided binomial test")
    t.add_argument("votes", help="votes.json as the page saves it")
    t.add_argument("--key", required=True, help="the page's key (<page>.key.json)")
    t.add_argument("--json", action="store_true", help="print JSON")
    t.set_defaults(handler=cmd_ab_tally)


def cmd_generate(args: argparse.Namespace) -> None:
    from lowbit.workflow_generate import GenerateOptions, default_result_path, generate_job, write_result

    if args.threads is not None and args.threads <= 0:
        raise LowbitError(f"--threads must be positive, got {args.threads}")
    opts = GenerateOptions(target=args.model, original=args.original, prompts=args.prompts, n_prompts=args.n_prompts,
                           new_tokens=args.new_tokens, threads=args.threads, original_engine=args.original_engine,
                           reuse_original=args.reuse_original)
    result = generate_job(opts, progress=not args.json)
    path = write_result(result, args.out or default_result_path(args.model))
    if args.json:
        print(json.dumps(result, indent=1, ensure_ascii=False))
        return
    print_generation(result)
    print(f"wrote {path}")


def generation_table(results: list[dict[str, Any]]) -> Table:
    """One row per generation result: its metrics against the original's continuations."""
    table = Table(title="greedy continuations vs the original's")
    for col in ("model", "engine", "BLEU", "chrF", "ROUGE-L", "exact", "1st diff"):
        table.add_column(col, justify="left" if col in ("model", "engine") else "right")
    for r in results:
        m = r["metrics"]
        table.add_row(r.get("label") or r["model"], r["engine"], f"{m['bleu']:.1f}", f"{m['chrf']:.1f}",
                      f"{m['rouge_l']:.3f}", f"{100 * m['exact_match']:.0f}%",
                      f"{m['tokens_to_divergence']:.1f}/{m['reference_tokens']:.1f}")
    return table


def print_generation(result: dict[str, Any], console: Console | None = None) -> None:
    """The metrics table and what the numbers mean."""
    console = console or Console()
    console.print(generation_table([result]))
    p = result["prompts"]
    console.print(f"[dim]{p['count']} prompts from {p['source']}, up to {p['new_tokens']} new tokens each; original "
                  f"{result['original']} in {result['original_engine']}, quantized in {result['engine']}. "
                  "BLEU and chrF "
                  "(0-100): sacrebleu corpus scores of the quantized text against the original's; ROUGE-L: mean F1; "
                  "exact: identical token ids; 1st diff: mean tokens generated before the first different one "
                  "/ mean length of the original's continuations.[/dim]")


def cmd_ab_page(args: argparse.Namespace) -> None:
    from lowbit.analysis.ab import check_generation, read_json, render_ab

    result = read_json(args.generation, "generation result")
    check_generation(result, args.generation)
    out = Path(args.out) if args.out else Path(args.generation).with_name("ab.html")
    page, key = render_ab(result, out, blind=not args.labelled, seed=args.seed, force=args.force)
    print(f"wrote {page} ({'labelled' if args.labelled else 'blind'}, {len(result['items'])} prompts) and its key {key}"
          + ("" if args.labelled else " (keep the key away from the people voting)"))


def cmd_ab_tally(args: argparse.Namespace) -> None:
    from lowbit.analysis.ab import read_json, tally

    summary = tally(read_json(args.votes, "votes file"), read_json(args.key, "A/B key"), args.votes, args.key)
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print_tally(summary)


def print_tally(summary: dict[str, Any], console: Console | None = None) -> None:
    """Counts, the quantized model's preference rate with its 95% interval, and the test's p-value."""
    console = console or Console()
    table = Table(title=f"A/B preferences (page {summary['page_id']}, {'blind' if summary['blind'] else 'labelled'}, "
                        f"{summary['voted']} of {summary['prompts']} prompts voted)")
    for col in ("quantized", "original", "tie", "quantized share", "95% CI", "p"):
        table.add_column(col, justify="right")
    rate, ci, p = summary["quantized_preference"], summary["ci95"], summary["p_value"]
    table.add_row(str(summary["quantized_preferred"]), str(summary["original_preferred"]), str(summary["ties"]),
                  "-" if rate is None else f"{100 * rate:.1f}%",
                  "-" if ci is None else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}%", "-" if p is None else f"{p:.3g}")
    console.print(table)
    models = summary.get("models") or {}
    console.print(f"[dim]quantized: {models.get('quantized')}; original: {models.get('original')}. {summary['test']}"
                  f"{' (every vote was a tie: nothing to test)' if rate is None and summary['voted'] else ''}.[/dim]")
