"""lowbit's GGUF files against llama.cpp's own quantizer *with its own importance matrix*, on held-out text.

Both sides start from lowbit's F32 GGUF of the default model and calibrate on the same text: 32 x 512-token
windows of pydoc topics drawn after the default evaluation windows, written to ``calib.txt``. llama.cpp's side runs
its real tools (``bench/llamacpp_tools.py`` builds them): ``llama-imatrix`` on that file, then ``llama-quantize
--imatrix`` per type. lowbit's side is ``export_gguf`` with ``--method gptq`` calibrated once on the same file.
Every file is evaluated in llama.cpp against the F32 file on 8 x 512 tokens of standard-library module docstrings
(``budget_table.held_out_text``), text neither side calibrated on: size, PPL, mean KLD (± standard error),
same-top-1. Writes the section "GGUF scoreboard" of bench/RESULTS_gguf.md; ``--resume`` keeps rows already in
OUT/results.json (same F32 file, calibration text and evaluation windows).

    .venv/bin/python bench/gguf_scoreboard.py [--types IQ4_XS,Q4_K_M] [--resume]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from budget_table import held_out_text  # noqa: E402
from llamacpp_tools import tools_dir  # noqa: E402
from results_file import write_section  # noqa: E402

from lowbit.data.text import calibration_windows, eval_windows, load_text, tokenize  # noqa: E402
from lowbit.eval.llamacpp import compare_logprobs, gguf_logprobs  # noqa: E402
from lowbit.export.gguf import GGUFExportOptions, all_targets, calibrate, export_gguf  # noqa: E402
from lowbit.model.load import load_model  # noqa: E402

TYPES = ("Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S",
         "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
TARGETS = ("IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_XS", "IQ2_XXS", "Q4_K_M", "Q3_K_M", "Q2_K")  # KLD <= 0.7x llama.cpp
TITLE = "## GGUF scoreboard: lowbit vs llama.cpp + its own imatrix, held-out text"


def calibration_file(loaded, out: Path, samples: int) -> Path:
    """The calibration windows lowbit draws by default (pydoc topics after the evaluation tokens), as text."""
    path = out / "calib.txt"
    if not path.is_file():
        ids = tokenize(loaded.tokenizer, load_text(None))
        windows = calibration_windows(ids, samples, 512, 8 * 512).ids
        path.write_text("\n".join(loaded.tokenizer.decode(w) for w in windows))
    return path


def greedy_text(path: Path, prompt: str = "The Python language", tokens: int = 16) -> str:
    """What llama.cpp generates from the file (greedy): the scoreboard's proof that every file loads and runs."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, verbose=False)
    try:
        return llm(prompt, max_tokens=tokens, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()


def run(cmd: list) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", default="bench/out_scoreboard")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "results.json"
    done = json.loads(saved.read_text()) if args.resume and saved.is_file() else {"rows": []}
    todo = [t for t in args.types.split(",") if t not in {r["type"] for r in done["rows"]}]
    tools = tools_dir()
    loaded = load_model(None)
    held = eval_windows(tokenize(loaded.tokenizer, load_text(held_out_text())), args.windows, 512).ids
    calib_txt = calibration_file(loaded, out, args.calib_samples)
    f32 = out / "f32.gguf"
    if not f32.is_file():
        export_gguf(GGUFExportOptions(type="F32", out=str(f32), method="rtn", force=True), False, loaded)
    ref = gguf_logprobs(f32, held)
    done["ppl_f32"] = compare_logprobs(ref, ref, held)["ppl"]
    imatrix = out / "imatrix.gguf"
    if todo and not imatrix.is_file():
        done["imatrix_seconds"] = run([tools / "llama-imatrix", "-m", f32, "-f", calib_txt, "-o", imatrix, "-c", 512,
                                       "-b", 512, "-t", 2, "--no-ppl"])
    opts = GGUFExportOptions(method="gptq", calib_text=str(calib_txt), calib_samples=10 ** 6, eval_tokens=0,
                             force=True)
    if todo:
        t0 = time.perf_counter()
        calib = calibrate(opts, loaded, all_targets(loaded), progress=False)
        done["calib_seconds"], done["calib_windows"] = time.perf_counter() - t0, calib.n_chunks
    for type_name in todo:
        ours, theirs = out / f"lowbit-{type_name}.gguf", out / f"llamacpp-{type_name}.gguf"
        row = {"type": type_name, "llamacpp_seconds": run([tools / "llama-quantize", "--imatrix", imatrix, f32, theirs,
                                                           type_name, 2])}
        summary = export_gguf(GGUFExportOptions(**{**opts.__dict__, "type": type_name, "out": str(ours)}), False,
                              loaded, calib)
        row["lowbit_seconds"] = summary["seconds"]["quantize"]
        row["lowbit_text"] = greedy_text(ours)
        for who, path in (("llamacpp", theirs), ("lowbit", ours)):
            m = compare_logprobs(ref, gguf_logprobs(path, held), held)
            row[who] = {"bytes": path.stat().st_size, "ppl": m["ppl"], "kld": m["kld"], "top1": m["top1"],
                        "kld_stderr": m["kld_stats"]["kld_stderr"], "kld_p99": m["kld_stats"]["kld_p99"]}
        done["rows"].append(row)
        print(json.dumps(row), flush=True)
        saved.write_text(json.dumps(done, indent=1))
        write_results(done, args)
    for row in done["rows"]:  # rows of an older run without a generation sample
        path = out / f"lowbit-{row['type']}.gguf"
        if "lowbit_text" not in row and path.is_file():
            row["lowbit_text"] = greedy_text(path)
    saved.write_text(json.dumps(done, indent=1))
    write_results(done, args)


def write_results(done: dict, args) -> None:
    lines = [TITLE, "", f"Command: `python {' '.join(sys.argv)}` ({platform.processor() or platform.machine()}, "
             f"2 threads). Both sides calibrate on the same {done.get('calib_windows', args.calib_samples)} x 512 "
             "tokens of pydoc topics (after the evaluation windows; `calib.txt`): llama.cpp with `llama-imatrix` "
             "then `llama-quantize --imatrix` (its own tools, built from llama-cpp-python's sources), lowbit with "
             "`--method gptq`. Evaluated in llama.cpp against the F32 file on "
             f"{args.windows} x 512 tokens of standard-library module docstrings (held out: neither side calibrated "
             f"on it); F32 PPL {done['ppl_f32']:.3f}. The default model's float weights are dequantized Q4_1 "
             "(asymmetric 4-bit, blocks of 32), which flatters 4-bit types; hidden size 576 fits no 256-value "
             "block, so most linears of an i-quant mix fall back to IQ4_NL, as llama.cpp does too.", "",
             "Every lowbit file also generated text in llama-cpp-python (greedy, 16 tokens after \"The Python "
             "language\"; in results.json).", "",
             "| type | llama.cpp MB | lowbit MB | size Δ | llama.cpp PPL | lowbit PPL | llama.cpp KLD | lowbit KLD | "
             "KLD ratio | llama.cpp top-1 | lowbit top-1 |", "|" + "---|" * 11]
    for r in done["rows"]:
        a, b = r["llamacpp"], r["lowbit"]
        mark = " (target ≤ 0.70)" if r["type"] in TARGETS else ""
        lines.append(f"| {r['type']} | {a['bytes'] / 1e6:.2f} | {b['bytes'] / 1e6:.2f} | "
                     f"{100 * (b['bytes'] / a['bytes'] - 1):+.2f}% | {a['ppl']:.3f} | {b['ppl']:.3f} | "
                     f"{a['kld']:.4f} ± {a['kld_stderr']:.4f} | {b['kld']:.4f} ± {b['kld_stderr']:.4f} | {b['kld'] / max(a['kld'], 1e-12):.2f}{mark} | "
                     f"{a['top1']:.4f} | {b['top1']:.4f} |")
    write_section(Path("bench/RESULTS_gguf.md"), TITLE, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
