"""QAT against the best post-training result at the same bits, on the default model (issue 13's LLM targets).

Each row runs ``lowbit qat`` (one process, alone on the machine): the post-training start (its KLD is measured on
the evaluation windows before training: that is the PTQ baseline, same windows, same process) and the trained
result. The ternary row trains on the grids of llama.cpp's TQ2_0 mix (``--gguf-type TQ2_0``), writes the GGUF
from the trained codes and evaluates it in llama.cpp, beside llama.cpp's own TQ2_0 quantization (round to
nearest, no imatrix) of the F32 GGUF of the same model.

Usage: ``.venv/bin/python bench/qat_table.py [--rows w2g64,w3g128,tq2] [--minutes 60]``, alone on the machine
(on a shared machine set OMP_NUM_THREADS=1: two-thread parallel regions beside another busy process were measured
170x slower on the fake-quant kernels, one thread is not slowed at all); results are appended
to bench/RESULTS_qat.md with the commands. The default model's float weights are dequantized Q4_1 (asymmetric
4-bit, groups of 32): 2- and 3-bit grids are far from that grid, so it does not flatter these rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_file import write_section  # noqa: E402

LOWBIT = str(Path(sys.executable).with_name("lowbit"))
OUT = Path(__file__).with_name("out_qat")

ROWS = {
    "w2g64": ["--scheme", "W2A16", "--group-size", "64", "--asym", "--method", "gptq", "--act-order"],
    "w2g64-rtn": ["--scheme", "W2A16", "--group-size", "64", "--asym", "--method", "rtn"],
    "w3g128": ["--scheme", "W3A16", "--group-size", "128", "--asym", "--method", "gptq", "--act-order"],
    "w3g128-rtn": ["--scheme", "W3A16", "--group-size", "128", "--asym", "--method", "rtn"],
    "w3g128-rtn-b": ["--scheme", "W3A16", "--group-size", "128", "--asym", "--method", "rtn"],  # other --extra
    "tq2": ["--gguf-type", "TQ2_0", "--method", "rtn"],
}


def run(cmd: list[str], log: Path | None = None) -> tuple[dict, float]:
    """Run a lowbit command that prints JSON; its progress (stderr) goes to ``log``."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log or OUT / "last.log", "w") as err:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): see {log or OUT / 'last.log'}")
    return json.loads(done.stdout), time.time() - t0


def qat_row(name: str, extra: list[str], minutes: float, steps: int) -> dict:
    out = OUT / name
    cmd = [LOWBIT, "qat", *ROWS[name], "--steps", str(steps), "--minutes", str(minutes), "--out", str(out),
           "--force", "--json", *extra]
    report, wall = run(cmd, OUT / f"{name}.log")
    qat = report["qat"]
    row = {"name": name, "command": " ".join(["lowbit", *cmd[1:]]), "spec": report["spec"], "init": qat["init"],
           "bpw": report["bits_per_weight"], "ptq_kld": qat["start_eval"]["kld"], "qat_kld": report["eval"]["kld"],
           "ptq_ppl": qat["start_eval"]["ppl"], "qat_ppl": report["eval"]["ppl"], "ppl_base": report["eval"]["ppl_base"],
           "steps": qat["steps_done"], "blocks_min": (report["seconds"].get("blocks") or 0.0) / 60,
           "train_min": (report["seconds"]["train"] + (report["seconds"].get("blocks") or 0.0)) / 60,
           "wall_min": wall / 60,
           "tokens": qat["steps_done"] * qat["options"]["batch_windows"] * qat["data"]["length"],
           "history": [h for h in qat["history"] if "monitor_kld" in h]}
    if name == "tq2":
        gguf = OUT / "tq2-qat.gguf"
        summary, _ = run([LOWBIT, "export", "gguf", str(out), "--type", "TQ2_0", "--out", str(gguf), "--force",
                          "--eval", "--json"])
        row["gguf"] = {"bytes": summary["bytes"], "kld": summary["eval"]["kld"], "ppl": summary["eval"]["ppl"],
                       "exact": summary["exact_from_codes"], "types": summary["tensor_types"]}
        row["llamacpp_tq2"] = llamacpp_tq2()
    return row


def llamacpp_tq2() -> dict:
    """llama.cpp's own TQ2_0 of the F32 GGUF (RTN, no imatrix), evaluated in llama.cpp on the same windows."""
    from gguf_vs_llamacpp import llama_quantize

    f32 = OUT / "smollm2-F32.gguf"
    if not f32.exists():
        run([LOWBIT, "export", "gguf", "--type", "F32", "--method", "rtn", "--out", str(f32), "--force", "--json"])
    dst = OUT / "llamacpp-TQ2_0.gguf"
    llama_quantize(f32, dst, "TQ2_0")
    from lowbit.cli_export import _evaluate, _reference
    from lowbit.model.load import load_model

    metrics = _evaluate(str(dst), _reference(load_model(None), 8))
    return {"bytes": dst.stat().st_size, "kld": metrics["kld"], "ppl": metrics["ppl"]}


def markdown(rows: list[dict]) -> str:
    lines = ["| row | spec | start | bpw | PTQ KLD | QAT KLD | QAT/PTQ | PTQ PPL | QAT PPL | steps | tokens | "
             "block-wise min | training min (both phases) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | `{r['spec']}` | {r['init']} | {r['bpw']:.3f} | {r['ptq_kld']:.4f} | "
                     f"{r['qat_kld']:.4f} | {r['qat_kld'] / r['ptq_kld']:.3f}x | {r['ptq_ppl']:.2f} | "
                     f"{r['qat_ppl']:.2f} | {r['steps']} | {r['tokens']} | {r.get('blocks_min', 0.0):.1f} | {r['train_min']:.1f} |")
    text = "\n".join(lines) + "\n"
    for r in rows:
        if "gguf" in r:
            g, ref = r["gguf"], r["llamacpp_tq2"]
            text += (f"\nTQ2_0 in llama.cpp (same 8x512 windows): lowbit QAT file {g['bytes'] / 1e6:.2f} MB, KLD "
                     f"{g['kld']:.4f}, PPL {g['ppl']:.2f} ({g['exact']} tensors written from the trained codes; types "
                     f"{g['types']}); llama.cpp's own TQ2_0 (RTN) {ref['bytes'] / 1e6:.2f} MB, KLD {ref['kld']:.4f}, "
                     f"PPL {ref['ppl']:.2f}: QAT/llama.cpp = {g['kld'] / ref['kld']:.3f}x.\n")
        curve = ", ".join(f"{h['step']}: {h['monitor_kld']:.3f}" for h in r["history"])
        text += f"\n{r['name']} held-out monitor KLD by step (2 windows): {curve}. Command: `{r['command']}`\n"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="w2g64,w3g128,tq2")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--extra", default="", help="more lowbit qat arguments for every row")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS_qat.md"))
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    rows = []
    for name in args.rows.split(","):
        rows.append(qat_row(name, args.extra.split(), args.minutes, args.steps))
        (OUT / f"{name}.json").write_text(json.dumps(rows[-1], indent=2))
        print(markdown(rows[-1:]), flush=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    text = (f"## QAT rows {args.rows} on the default model ({time.strftime('%Y-%m-%d')}, {model}, 2 cores)\n\n"
            f"Command: `{'OMP_NUM_THREADS=' + os.environ['OMP_NUM_THREADS'] + ' ' if 'OMP_NUM_THREADS' in os.environ else ''}"
            f".venv/bin/python bench/qat_table.py --rows {args.rows} --minutes {args.minutes:g} "
            f"--steps {args.steps}{' --extra ' + repr(args.extra) if args.extra else ''}`. Evaluation: the first 8 x "
            "512 tokens of pydoc topics; training windows come after them (never the evaluation tokens); PTQ = the "
            "post-training start of the same run, on the same windows. Training: block-wise reconstruction (each "
            "decoder block against the original block's output), then KL to the original's next-token distribution; "
            "AdamW, cosine schedule, bf16 autocast. Training minutes count both phases. Environment: "
            f"{ {k: v for k, v in os.environ.items() if k.startswith(('OMP_', 'MALLOC_'))} }.\n\n" + markdown(rows))
    write_section(args.out, text.splitlines()[0], text)


if __name__ == "__main__":
    main()
