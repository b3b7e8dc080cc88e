"""Speed and memory of the default LLM (SmolLM2-135M) where users run it: every GGUF type lowbit writes beside the
F16 GGUF in llama.cpp, and the W4A16 int4 MatMulNBits KV-cache ONNX graph beside the fp32 KV-cache graph in
onnxruntime (the issue asks int4 decode >= 1.5x fp32). Writes a section of bench/RESULTS_speed.md.

    .venv/bin/python bench/llm_speed.py [--types Q8_0,Q4_K_M] [--threads 2] [--runs 3] [--prompt-tokens 512]
                                         [--new-tokens 64] [--model smollm2] [--workdir DIR] [--out FILE]

Everything goes through ``lowbit bench llm`` (``lowbit.workflow_bench``): each file is timed in a fresh process
(peak RSS of that process), on the first ``--prompt-tokens`` tokens of the default text, median of ``--runs``
runs. GGUF files are written with ``--method rtn`` (llama.cpp's reference rounding: the type decides the
kernels and so the speed; the method only the values). The ONNX checkpoint is ``lowbit quantize --scheme W4A16
--group-size 128 --method rtn --format lowbit,onnx`` (its defaults otherwise: int8 embedding rows, which the
tied head reads), written as MatMulNBits at the default accuracy level 4 (int8 activations inside the kernel)
and, as a second row, at level 0 (float compute, exactly what lowbit evaluated). ``--types ''`` times the ONNX
pair alone (its own section of the results file). Run it alone on the machine: timings are shared with
whatever else runs.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

from results_file import write_section

from lowbit.cli import main as lowbit
from lowbit.eval.speed import SpeedOptions
from lowbit.export.gguf import GGUFExportOptions, export_gguf
from lowbit.gguf.mixes import MIXES
from lowbit.model.load import load_model
from lowbit.workflow_bench import BenchLLMOptions, bench_llm

GGUF_TYPES = tuple(name for name in MIXES if name != "F16")  # F16 is the original of the run
ONNX_TARGET = 1.5  # the issue: int4 MatMulNBits decode >= 1.5x the fp32 graph's


def run(argv: list[str]) -> None:
    if lowbit(argv) != 0:
        raise SystemExit(f"lowbit {' '.join(argv)} failed")


def write_files(args: argparse.Namespace, work: Path) -> list[Path]:
    """The GGUF files (one per type) and the two int4 ONNX graphs to time."""
    loaded = load_model(args.model)
    files = []
    for name in args.types:
        out = work / f"{Path(args.model).stem.lower()}-{name}.gguf"
        print(f"writing {out.name}", file=sys.stderr, flush=True)
        export_gguf(GGUFExportOptions(model=args.model, type=name, out=str(out), method="rtn", force=True),
                    progress=False, loaded=loaded)
        files.append(out)
    del loaded
    if args.onnx:
        ckpt = work / "w4"
        run(["quantize", args.model, "--scheme", "W4A16", "--group-size", "128", "--method", "rtn", "--no-eval",
             "--format", "lowbit,onnx", "--out", str(ckpt), "--force", "--json"])
        (work / "w4-a0-onnx").mkdir(exist_ok=True)
        run(["export", "onnx", str(ckpt), "--accuracy-level", "0", "--out", str(work / "w4-a0-onnx" / "model.onnx"),
             "--force", "--json"])
        files += [work / "w4-onnx", work / "w4-a0-onnx"]
    return files


def _cpu() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _versions() -> str:
    import llama_cpp
    import onnxruntime

    return f"llama-cpp-python {llama_cpp.__version__}, onnxruntime {onnxruntime.__version__}"


def markdown(result: dict, args: argparse.Namespace) -> tuple[str, str]:
    """(section title, section text) of the results file."""
    engines = "llama.cpp and onnxruntime" if args.types else "onnxruntime"
    title = f"## Speed and memory in {engines}: {Path(args.model).name}"
    o = result["options"]
    lines = [title, "",
             f"Command: `python {' '.join(sys.argv)}`. Each file timed in its own process (`lowbit bench llm`): "
             f"a {o['prompt_tokens']}-token prompt (pydoc topics) in one call, the first token picked greedily, "
             f"then {o['new_tokens']} single-token decode steps with the KV cache; median of {o['runs']} runs, "
             f"{o['threads']} threads; peak RSS of that process. Ratios: to the same engine's original (F16 GGUF "
             f"in llama.cpp, the fp32 KV-cache graph in onnxruntime). GGUF files written with --method rtn; "
             "a type names the file's mix: tensors whose rows do not fill its blocks fall back as llama.cpp's "
             "do (lowbit.gguf.mixes). ONNX: `lowbit quantize --scheme W4A16 --group-size 128 --method rtn "
             "--format lowbit,onnx` (MatMulNBits at the default accuracy level 4) and the same checkpoint with "
             f"--accuracy-level 0. Machine: {_cpu()}, {_versions()}.", "",
             "| file | engine | MB | prompt tok/s | decode tok/s | TTFT ms | peak RSS MB | size x | prompt x "
             "| decode x | TTFT x | memory x |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        q = r["ratios"]
        lines.append(f"| {r['label']} | {r['engine']} | {r['bytes'] / 1e6:.1f} | {r['prompt_tps']:.1f} | "
                     f"{r['decode_tps']:.1f} | {r['ttft_s'] * 1e3:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} | "
                     f"{q['bytes']:.2f} | {q['prompt_tps']:.2f} | {q['decode_tps']:.2f} | {q['ttft_s']:.2f} | "
                     f"{q['peak_rss_bytes']:.2f} |")
    onnx = [r for r in result["rows"] if r["engine"] == "onnxruntime" and not r["original"]]
    if onnx:
        lines.append("")
        for r in onnx:
            ratio = r["ratios"]["decode_tps"]
            verdict = "met" if ratio >= ONNX_TARGET else "NOT met"
            lines.append(f"- {r['label']}: decode {ratio:.2f}x the fp32 graph's (target >= {ONNX_TARGET}x: {verdict}).")
    return title, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="built-in name or Hugging Face folder (default smollm2)")
    parser.add_argument("--types", default=",".join(GGUF_TYPES), help="comma-separated GGUF types (default: all "
                                                                       "lowbit writes but F16, the original)")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false", help="leave the ONNX pair out")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", help="keep the written files here (default: a temporary folder)")
    parser.add_argument("--out", default="bench/RESULTS_speed.md")
    args = parser.parse_args()
    args.types = [t.strip() for t in args.types.split(",") if t.strip()]
    speed = SpeedOptions(args.prompt_tokens, args.new_tokens, args.runs, args.threads)
    with tempfile.TemporaryDirectory(prefix="llm-speed-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = write_files(args, work)
        result = bench_llm(BenchLLMOptions(tuple(str(f) for f in files), args.model, speed, str(work / "originals")))
    title, text = markdown(result, args)
    print(text)
    write_section(Path(args.out), title, text)


if __name__ == "__main__":
    main()
