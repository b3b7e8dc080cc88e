"""Generation quality of the default LLM's quantized forms against the original (issue 14): W8A16 and W4A16 (RTN and
GPTQ) lowbit folders in transformers, Q8_0, Q4_K_M and Q2_K GGUF files in llama.cpp. Writes a section of
bench/RESULTS_generation.md.

    .venv/bin/python bench/generation_table.py [--workdir DIR] [--new-tokens 48] [--n-prompts 32]

Every model is made with lowbit's defaults for its row (only ``--scheme``, ``--method`` or ``--type`` given; GGUF
files use the default GGUF method, GPTQ inside the k-quant grids) and judged with ``lowbit generate``: greedy
continuations of the same prompts from the original and the quantized model, scored with BLEU and chrF
(sacrebleu), ROUGE-L, exact match and tokens to the first divergence. Two prompt sets: the built-in one (sentence
starts from pydoc topics after the evaluation windows) and a held-out one written here from standard-library
module docstrings, text no lowbit default was chosen on. The original runs in transformers; the GGUF rows are
also judged against the F16 GGUF in llama.cpp (``--original-engine llama.cpp``), which takes the engines'
different arithmetic out of the comparison, and the F16 GGUF against the transformers original shows what that
arithmetic alone costs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path

from results_file import write_section

from lowbit.cli import main as lowbit

DOC_MODULES = ("argparse", "ast", "asyncio", "base64", "bisect", "calendar", "codecs", "collections", "contextlib",
               "csv", "dataclasses", "decimal", "difflib", "email", "enum", "fractions", "functools", "gzip",
               "heapq", "hmac", "inspect", "ipaddress", "json", "locale", "logging", "mailbox", "netrc", "pathlib",
               "pickletools", "queue", "random", "sched", "secrets", "shlex", "shutil", "statistics", "string",
               "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tokenize", "typing", "uuid", "wave",
               "zipfile", "cmd", "configparser", "copy", "doctest", "fnmatch", "ftplib", "getopt", "gettext", "glob",
               "imaplib", "mimetypes", "optparse", "pdb", "pprint", "pydoc", "smtplib", "socket", "sqlite3",
               "struct", "timeit", "trace", "unittest", "weakref", "webbrowser")
PROMPT_WORDS = 12
HF_ROWS = (("W8A16 RTN", 8, "w8", ["--scheme", "W8A16"]),  # label, bits, folder, flags
           ("W4A16 RTN", 4, "w4-rtn", ["--scheme", "W4A16"]),
           ("W4A16 GPTQ", 4, "w4-gptq", ["--scheme", "W4A16", "--method", "gptq"]))
GGUF_ROWS = (("Q8_0", 8), ("Q4_K_M", 4), ("Q2_K", 2))  # type (the label), bits
F16 = "F16 (engine arithmetic only)"


def run(argv: list[str]) -> None:
    print("lowbit " + " ".join(argv), file=sys.stderr, flush=True)
    if lowbit(argv) != 0:
        raise SystemExit(f"lowbit {' '.join(argv)} failed")


def docstring_prompts(path: Path, n: int) -> Path:
    """A JSONL prompts file: the first ``PROMPT_WORDS`` words of prose from each standard-library module's
    docstring (modules without enough prose are skipped)."""
    lines = []
    for name in DOC_MODULES:
        doc = importlib.import_module(name).__doc__ or ""
        words = [w for line in doc.splitlines() if line.strip() and not line.startswith((" ", "\t", ">>>"))
                 for w in line.split()]
        if len(words) >= PROMPT_WORDS + 8:
            lines.append(json.dumps({"prompt": " ".join(words[:PROMPT_WORDS]), "source": f"{name}.__doc__"}))
        if len(lines) == n:
            break
    path.write_text("\n".join(lines) + "\n")
    return path


def make_models(work: Path) -> list[tuple[str, int, Path]]:
    """(label, bits, path) of the quantized models and the F16 GGUF, skipping any already in ``work``."""
    models = []
    for label, bits, name, flags in HF_ROWS:
        out = work / name
        if not (out / "report.json").exists():
            run(["quantize", *flags, "--no-eval", "--out", str(out), "--force", "--json"])
        models.append((label, bits, out))
    for gguf_type, bits in (("F16", 16), *GGUF_ROWS):
        out = work / f"smollm2-{gguf_type}.gguf"
        if not out.exists():
            run(["quantize", "--format", "gguf", "--type", gguf_type, "--no-eval", "--out", str(out), "--force",
                 "--json"])
        models.append((F16 if gguf_type == "F16" else gguf_type, bits, out))
    return models


def judge(target: Path, out: Path, prompts: Path | None, args, original: Path | None = None,
          reuse: Path | None = None) -> dict:
    """``lowbit generate`` of ``target`` (skipped if ``out`` exists); ``reuse``: an earlier result on the same
    prompts whose original continuations are taken instead of generating them again (lowbit checks they match)."""
    argv = ["generate", str(target), "--out", str(out), "--new-tokens", str(args.new_tokens), "--json"]
    argv += ["--prompts", str(prompts)] if prompts else ["--n-prompts", str(args.n_prompts)]
    if original is not None:
        argv += ["--original", str(original), "--original-engine", "llama.cpp"]
    if reuse is not None:
        argv += ["--reuse-original", str(reuse)]
    if not out.exists():
        run(argv)
    return json.loads(out.read_text())


def markdown(rows: list[dict], args) -> tuple[str, str]:
    title = "## Generation quality of SmolLM2-135M's quantized forms (lowbit generate)"
    lines = [title, "",
             f"Command: `python {' '.join(sys.argv)}`. Greedy continuations of {args.new_tokens} tokens; BLEU and "
             "chrF are sacrebleu corpus scores (0-100) of the quantized continuations against the original's, "
             "ROUGE-L the mean F1, 'first diff' the mean tokens before the first differing token. Prompt sets: "
             f"'pydoc' = {args.n_prompts} built-in sentence starts from pydoc topics after the evaluation windows; "
             "'docstrings' = sentence starts from standard-library module docstrings (held out: no default was "
             "chosen on them). Models: lowbit defaults per row; GGUF files by `lowbit quantize --format gguf "
             "--type T` (GPTQ inside the k-quant grids). The default model's float weights are its dequantized "
             "Q4_1 GGUF (asymmetric 4-bit, blocks of 32), which flatters 4-bit grids close to that one.", "",
             "| model | engine | original in | prompts | BLEU | chrF | ROUGE-L | exact | first diff |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['row']} | {r['engine']} | {r['original_engine']} | {r['prompt_set']} | {m['bleu']:.1f} | "
                     f"{m['chrf']:.1f} | {m['rouge_l']:.3f} | {m['exact_match']:.2f} | "
                     f"{m['tokens_to_divergence']:.1f} |")
    lines += ["", *verdicts(rows)]
    return title, "\n".join(lines) + "\n"


def verdicts(rows: list[dict]) -> list[str]:
    """Whether W8A16 scores higher than every 4-bit row (BLEU, chrF and ROUGE-L), per prompt set."""
    out = []
    for prompt_set in dict.fromkeys(r["prompt_set"] for r in rows):
        w8 = next(r for r in rows if r["row"] == "W8A16 RTN" and r["prompt_set"] == prompt_set)["metrics"]
        four = [r for r in rows if r["prompt_set"] == prompt_set and r["bits"] == 4]
        beaten = [f"{r['row']} ({r['original_engine']} original)" for r in four
                  if any(r["metrics"][k] >= w8[k] for k in ("bleu", "chrf", "rouge_l"))]
        out.append(f"- {prompt_set}: W8A16 scores higher than every 4-bit row on BLEU, chrF and ROUGE-L: "
                   + ("yes." if not beaten else f"NO, not above {', '.join(beaten)}."))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="keep models and results here (default: a temporary folder)")
    parser.add_argument("--n-prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--out", default="bench/RESULTS_generation.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gen-table-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = make_models(work)
        prompt_sets = {"pydoc": None, "docstrings": docstring_prompts(work / "docstrings.jsonl", args.n_prompts)}
        f16 = next(path for label, _, path in models if label == F16)
        rows = []
        for set_name, prompts in prompt_sets.items():
            first: dict[str, Path] = {}  # the first result per original engine: the others reuse its original side
            for label, bits, path in models:
                # GGUF rows: against the transformers original, then against the F16 GGUF in llama.cpp
                originals = [None, f16] if path.suffix == ".gguf" and label != F16 else [None]
                for original in originals:
                    tag = "llama" if original else "hf"
                    out = work / f"gen-{set_name}-{path.stem}-{tag}.json"
                    result = judge(path, out, prompts, args, original, first.get(tag))
                    first.setdefault(tag, out)
                    rows.append({"row": label, "engine": result["engine"], "original_engine": result["original_engine"],
                                 "prompt_set": set_name, "bits": bits, "metrics": result["metrics"]})
                    print(json.dumps(rows[-1]), flush=True)
    title, text = markdown(rows, args)
    print(text)
    write_section(Path(args.out), title, text)


if __name__ == "__main__":
    main()
