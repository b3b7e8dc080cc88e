"""lowbit's int8 ONNX export of all-MiniLM-L6-v2 against onnxruntime's own quantize_dynamic, in one run.

Every model is an ONNX file run by onnxruntime (CPU provider, 2 intra-op threads, all graph optimizations):
the float graph lowbit exports (mean pooling inside the graph), onnxruntime's ``quantize_dynamic`` of that
same file (default settings, and per_channel=True), and ``lowbit export onnx`` int8 graphs. Inputs: the first
256 paragraphs of the pydoc topics (lowbit.data.text.paragraphs), at most 128 tokens, batches of 32. Reported:
file size, cosine of each embedding to the float graph's (mean and minimum), and the seconds one pass over
the 256 paragraphs takes (median of --reps passes; the models take turns so that load changes hit all alike),
and, from one profiled pass per model in a separate session, where onnxruntime spends its kernel time (op types
after its graph fusions: which kernels each graph really runs).
lowbit's calibration (GPTQ, per-token sensitivity) uses the paragraphs after those 256. Writes
bench/RESULTS_onnx.md.

    .venv/bin/python bench/onnx_minilm.py [--reps 5] [--threads 2] [--out out/onnx_bench] [--reuse]

``--reuse`` times the files an earlier run left in ``--out`` (with the notes and fake-quant cosines it kept
beside them, in kept.json) instead of writing them again: the writing is minutes of calibration, the timing wants the machine
to itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_file import write_section  # noqa: E402

from lowbit.data.text import load_text, paragraphs  # noqa: E402
from lowbit.eval.encoder import embed  # noqa: E402
from lowbit.export.onnx import EVAL_PARAGRAPHS, OnnxExportOptions, export_onnx  # noqa: E402
from lowbit.model.load import load_model  # noqa: E402

TITLE = "## ONNX: MiniLM int8 in onnxruntime, lowbit vs quantize_dynamic"
READING = (
    "Reading: quantize_dynamic's default loses accuracy to per-tensor weight scales (and, on AVX2 CPUs without "
    "VNNI, to the saturation of onnxruntime's uint8 x int8 kernel, which sums pairs of products in int16, with "
    "full 8-bit weight codes). lowbit's graph keeps that kernel exact on every x86 CPU by storing weights on a "
    "7-bit grid (|code| <= 64, GPTQ-rounded), per output channel. Its per-tensor inputs are asymmetric: one "
    "DynamicQuantizeLinear, the node quantize_dynamic uses, which onnxruntime fuses with the product into "
    "DynamicQuantizeMatMul (range and codes in one kernel); the symmetric rule (max|x| / 127.5, the previous "
    "default) needs ReduceMax, ReduceMin and QuantizeLinear as separate passes, and the kernel profile showed "
    "those passes were the whole gap to quantize_dynamic. The linears a per-tensor scale hurts most (measured one "
    "at a time on the pydoc paragraphs after the 256 evaluation ones) get symmetric per-token inputs, and "
    "embedding rows are int8.")


def batches(tokenizer, sentences: list[str], size: int) -> list[dict[str, np.ndarray]]:
    out = []
    for i in range(0, len(sentences), size):
        b = tokenizer(sentences[i:i + size], padding=True, truncation=True, max_length=128, return_tensors="np")
        out.append({k: np.asarray(b[k], dtype=np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})
    return out


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    names = {i.name for i in sess.get_inputs()}
    return np.concatenate([sess.run(None, {k: v for k, v in f.items() if k in names})[0] for f in feeds])


def kernel_profile(path: Path, feeds: list[dict[str, np.ndarray]], threads: int, out: Path) -> dict[str, float]:
    """Op type -> share of onnxruntime's kernel time in one profiled pass (after a warm-up batch), from its own
    profiler: the kernels the graph runs once onnxruntime has fused it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    run(sess, feeds[:1])
    options.enable_profiling = True
    options.profile_file_prefix = str(out / f"profile_{path.stem}")
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    run(sess, feeds)
    trace = Path(sess.end_profiling())
    totals: dict[str, float] = {}
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + event["dur"]
    trace.unlink()
    whole = sum(totals.values()) or 1.0
    return {op: t / whole for op, t in sorted(totals.items(), key=lambda kv: -kv[1])}


def machine() -> str:
    """The CPU and the x86 features that pick onnxruntime's integer kernels."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    features = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{name or 'unknown CPU'} ({', '.join(features) or 'no AVX2'}), {os.cpu_count()} cores"


def cosines(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    return (reference * other).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(other, axis=1)


def main() -> None:
    from onnxruntime.quantization import quantize_dynamic

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default="out/onnx_bench")
    ap.add_argument("--reuse", action="store_true", help="time the files an earlier run left in --out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    sentences = paragraphs(load_text(None), EVAL_PARAGRAPHS)
    tokenizer = load_model("minilm").tokenizer
    feeds = batches(tokenizer, sentences, args.batch)
    files: dict[str, Path] = {}
    notes: dict[str, str] = {}

    kept = out / "kept.json"  # notes and fake-quant embeddings of the files below, for --reuse
    reuse = json.loads(kept.read_text()) if args.reuse and kept.is_file() else {}
    fp32 = out / "fp32.onnx"
    if not reuse:
        export_onnx(OnnxExportOptions(mode="float", out=str(fp32), force=True))
    files["fp32 (lowbit export, float)"] = fp32
    for label, kwargs in (("onnxruntime quantize_dynamic (int8, default)", {}),
                          ("onnxruntime quantize_dynamic (int8, per_channel)", {"per_channel": True})):
        path = out / f"ort_dynamic{'_per_channel' if kwargs else ''}.onnx"
        files[label] = path
        if reuse:
            continue
        start = time.perf_counter()
        quantize_dynamic(str(fp32), str(path), **kwargs)
        notes[label] = f"{time.perf_counter() - start:.0f} s to quantize"

    fake_quant = {}
    for label, name, options in (
            ("lowbit int8 (default: gptq, int7 weights, asym per-tensor inputs, 8 per-token linears)", "lowbit_int8",
             {}),
            ("lowbit int8 (--method rtn: no GPTQ, otherwise the same)", "lowbit_int8_rtn", {"method": "rtn"}),
            ("lowbit int8 (--act int8:tensor:dynamic --token-linears 12: the previous default)", "lowbit_int8_sym",
             {"activations": "int8:tensor:dynamic", "token_linears": 12})):
        path = out / f"{name}.onnx"
        files[label] = path
        if reuse:
            continue
        loaded = load_model("minilm")
        summary = export_onnx(OnnxExportOptions(out=str(path), force=True, **options), loaded=loaded)
        token = [r["targets"][0] for r in summary["recipe"]["rules"] if "token" in str(r.get("input"))]
        notes[label] = (f"{summary['seconds']:.0f} s to quantize; per-token inputs: "
                        f"{', '.join(t.replace('encoder.layer.', 'L') for t in token) or 'none'}")
        fake_quant[label] = embed(loaded.model, loaded.tokenizer, sentences, batch_size=args.batch,
                                  progress=False).numpy()
    if reuse:
        notes = reuse["notes"]

    sessions = {label: session(path, args.threads) for label, path in files.items()}
    outputs = {label: run(sess, feeds) for label, sess in sessions.items()}
    seconds: dict[str, list[float]] = {label: [] for label in files}
    for _ in range(args.reps):
        for label, sess in sessions.items():
            start = time.perf_counter()
            run(sess, feeds)
            seconds[label].append(time.perf_counter() - start)

    fake_quant_cosine = {label: float(cosines(values, outputs[label]).mean()) for label, values in fake_quant.items()}
    if reuse:
        fake_quant_cosine = reuse["fake_quant_cosine"]
    else:  # what a later --reuse run reports for these files
        kept.write_text(json.dumps({"notes": notes, "fake_quant_cosine": fake_quant_cosine}, indent=1))
    kernels = {label: kernel_profile(path, feeds, args.threads, out) for label, path in files.items()}
    reference = outputs[next(iter(files))]
    base = float(np.median(seconds[next(iter(files))]))
    rows = []
    for label, path in files.items():
        cos = cosines(reference, outputs[label])
        median = float(np.median(seconds[label]))
        row = {"model": label, "mb": path.stat().st_size / 1e6, "cosine": float(cos.mean()),
               "cosine_min": float(cos.min()), "seconds": median, "speedup": base / median,
               "all_seconds": seconds[label], "note": notes.get(label, ""), "kernels": kernels[label]}
        if label in fake_quant_cosine:
            row["ort_vs_lowbit_fake_quant"] = fake_quant_cosine[label]
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_results(rows, args)


def write_results(rows: list[dict], args) -> None:
    import onnxruntime

    cmd = "python " + " ".join(sys.argv)
    lines = [TITLE, "", f"Command: `{cmd}`", "",
             f"all-MiniLM-L6-v2 (built-in `minilm`), onnxruntime {onnxruntime.__version__} CPU provider, "
             f"{args.threads} intra-op threads, ORT_ENABLE_ALL; the first {EVAL_PARAGRAPHS} pydoc paragraphs "
             f"(lowbit.data.text.paragraphs), max 128 tokens, batches of {args.batch}, mean-pooled embedding "
             "(pooling inside every graph). Cosine: to the fp32 graph's embedding of the same paragraph. Seconds: one "
             f"pass over the {EVAL_PARAGRAPHS} paragraphs, median of {args.reps} passes, models in turn. "
             f"Machine: {machine()}. Kernel time: each model's top op types in onnxruntime's profile of one pass.",
             "",
             "| model | MB | cosine mean | cosine min | seconds | speed-up vs fp32 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mb']:.1f} | {r['cosine']:.4f} | {r['cosine_min']:.4f} | "
                     f"{r['seconds']:.2f} | {r['speedup']:.2f}x |")
    lines += ["", READING, "", "Notes:"]
    for r in rows:
        extra = []
        if r["note"]:
            extra.append(r["note"])
        if "ort_vs_lowbit_fake_quant" in r:
            extra.append(f"mean cosine of the onnxruntime output to lowbit's own fake-quant model "
                         f"{r['ort_vs_lowbit_fake_quant']:.4f}")
        extra.append("passes " + ", ".join(f"{s:.2f}" for s in r["all_seconds"]) + " s")
        extra.append("kernel time: " + ", ".join(f"{op} {share:.0%}" for op, share in list(r["kernels"].items())[:6]))
        lines.append(f"- {r['model']}: " + "; ".join(extra))
    write_section(Path("bench/RESULTS_onnx.md"), TITLE, "\n".join(lines) + "\n")
    Path(args.out, "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
