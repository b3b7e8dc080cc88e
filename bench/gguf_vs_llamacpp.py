"""lowbit's GGUF quantizer against llama.cpp's own, both from the same float weights, judged in llama.cpp.

lowbit writes an F32 GGUF of the model; llama.cpp's quantizer (llama_model_quantize, no imatrix) turns it into
each type; lowbit writes the same types (importance-weighted search + error feedback, calibration text drawn
after the evaluation windows). Every file is evaluated in llama.cpp on the evaluation windows against the F32
file: size, PPL, mean KLD, top-1 agreement. Writes bench/RESULTS_gguf.md.

    .venv/bin/python bench/gguf_vs_llamacpp.py [--types Q4_K_M,Q4_0] [--calib-samples 32] [--method gptq]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from results_file import write_section  # noqa: E402

from lowbit.data.text import eval_windows, load_text, tokenize  # noqa: E402
from lowbit.eval.llamacpp import compare_logprobs, gguf_logprobs  # noqa: E402
from lowbit.export.gguf import GGUFExportOptions, all_targets, calibrate, export_gguf  # noqa: E402
from lowbit.gguf.mixes import get_mix  # noqa: E402
from lowbit.model.load import load_model  # noqa: E402

TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")


def llama_quantize(src: Path, dst: Path, type_name: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = get_mix(type_name).file_type
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed for {type_name}: {rc}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", default="bench/out_gguf")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows in OUT/results.json and measure only the types missing there (the "
                         "calibration is deterministic, so the resumed rows use the same statistics)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = json.loads((out / "results.json").read_text()) if args.resume and (out / "results.json").is_file() else []
    todo = [t for t in args.types.split(",") if t not in {r["type"] for r in done}]
    loaded = load_model(None)
    windows = eval_windows(tokenize(loaded.tokenizer, load_text(None)), args.windows, 512).ids
    f32 = out / "f32.gguf"
    export_gguf(GGUFExportOptions(type="F32", out=str(f32), method="rtn", force=True), False, loaded)
    ref = gguf_logprobs(f32, windows)
    ppl_f32 = compare_logprobs(ref, ref, windows)["ppl"]
    opts = GGUFExportOptions(method=args.method, calib_samples=args.calib_samples, force=True,
                             eval_tokens=windows.numel())
    t0 = time.perf_counter()
    calib = calibrate(opts, loaded, all_targets(loaded), progress=False) if args.method != "rtn" and todo else None
    t_calib = time.perf_counter() - t0
    if calib is not None:
        (out / "calibration_seconds.json").write_text(json.dumps(t_calib))
    elif (out / "calibration_seconds.json").is_file():  # resumed with nothing left to measure: only rewrite
        t_calib = json.loads((out / "calibration_seconds.json").read_text())
    rows = list(done)
    for type_name in todo:
        ours, theirs = out / f"lowbit-{type_name}.gguf", out / f"llamacpp-{type_name}.gguf"
        llama_quantize(f32, theirs, type_name)
        summary = export_gguf(GGUFExportOptions(**{**opts.__dict__, "type": type_name, "out": str(ours)}), False,
                              loaded, calib)
        row = {"type": type_name, "lowbit_seconds": summary["seconds"]["quantize"]}
        for who, path in (("llamacpp", theirs), ("lowbit", ours)):
            m = compare_logprobs(ref, gguf_logprobs(path, windows), windows)
            row[who] = {"bytes": path.stat().st_size, **m}
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_results(rows, args, t_calib, ppl_f32)  # after every type: an interrupted run keeps what it measured
    if not todo:
        write_results(rows, args, t_calib, ppl_f32)


def write_results(rows: list[dict], args, t_calib: float, ppl_f32: float) -> None:
    cmd = "python " + " ".join(sys.argv)
    lines = ["# GGUF: lowbit vs llama.cpp's quantizer (SmolLM2-135M-Instruct, evaluated in llama.cpp)", "",
             f"Command: `{cmd}`", "",
             f"Reference: lowbit's F32 GGUF of the default model under llama.cpp, PPL {ppl_f32:.3f} on "
             f"{args.windows}x512 tokens of pydoc topics (lowbit.data.text eval windows). llama.cpp files: "
             "llama_model_quantize from that F32 file, no imatrix. lowbit files: method "
             f"`{args.method}`, {args.calib_samples}x512 calibration tokens drawn after the evaluation windows "
             f"(calibration {t_calib:.0f} s, once for all types). A calibrated lowbit file now follows "
             "llama-quantize's plan *with* an importance matrix (Q4_0: the first eighth of ffn_down on Q4_1), so "
             "rows measured since then may differ in size from llama.cpp's here; the fair comparison, llama.cpp "
             "with its own imatrix on held-out text, is the GGUF scoreboard below."
             + (" Resumed: rows already in results.json come from an earlier run of the same command (same float "
               "file and calibration windows; that run may have been on another machine, with bf16 calibration "
               "passes where the CPU had native bf16), and the calibration time is the last run's." if args.resume
               else ""),
             *([] if len(rows) == len(args.types.split(",")) else ["", f"(partial: {len(rows)} types so far)"]), "",
             "| type | llama.cpp MB | lowbit MB | size Δ | llama.cpp PPL | lowbit PPL | llama.cpp KLD | lowbit KLD | "
             "KLD ratio | llama.cpp top-1 | lowbit top-1 |", "|" + "---|" * 11]
    for r in rows:
        a, b = r["llamacpp"], r["lowbit"]
        lines.append(f"| {r['type']} | {a['bytes'] / 1e6:.2f} | {b['bytes'] / 1e6:.2f} | "
                     f"{100 * (b['bytes'] / a['bytes'] - 1):+.2f}% | {a['ppl']:.3f} | {b['ppl']:.3f} | {a['kld']:.4f} | "
                     f"{b['kld']:.4f} | {b['kld'] / max(a['kld'], 1e-12):.2f} | {a['top1']:.4f} | {b['top1']:.4f} |")
    write_section(Path("bench/RESULTS_gguf.md"), lines[0], "\n".join(lines) + "\n")
    Path(args.out, "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
