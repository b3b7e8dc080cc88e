"""Evaluation at scale (issue 14, part 4): peak memory of ``lowbit eval`` for 8 and 64 windows, and the KLD error
of keeping the original's log-probabilities in fp16 instead of fp32.

Each evaluation runs in its own process (``lowbit eval CHECKPOINT --windows N --json``); its peak resident memory
is the child's own ``ru_maxrss`` (os.wait4), so one run's memory does not hide another's. The checkpoint is
lowbit's W4A16 g128 RTN of the default model (made first if missing). The default model's float weights are
dequantized Q4_1 (asymmetric 4-bit, groups of 32); that flatters 4-bit KLDs, but this script compares the
evaluation itself, not the quantization.

Usage: ``.venv/bin/python bench/eval_memory.py [--windows 8,64]``, alone on the machine; results go to
bench/RESULTS_eval.md with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_file import write_section  # noqa: E402

LOWBIT = str(Path(sys.executable).with_name("lowbit"))
OUT = Path(__file__).with_name("out_eval")


def run_measured(cmd: list[str]) -> tuple[dict, float, float]:
    """(JSON it printed, its peak RSS in MB, seconds) of one child process."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(OUT / "last.log", "w") as err:
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        stdout = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"failed: {' '.join(cmd)} (see {OUT / 'last.log'})")
    return json.loads(stdout), usage.ru_maxrss / 1024, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", default="8,64")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS_eval.md"))
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    ckpt = OUT / "smollm2-w4a16-g128"
    if not (ckpt / "report.json").exists():
        subprocess.run([LOWBIT, "quantize", "--scheme", "W4A16", "--group-size", "128", "--no-eval", "--out",
                        str(ckpt), "--force"], check=True, stdout=subprocess.DEVNULL)
    rows = []
    for n in (int(w) for w in args.windows.split(",")):
        for store in ("fp32", "fp16"):
            report, rss, seconds = run_measured([LOWBIT, "eval", str(ckpt), "--windows", str(n), "--reference-store",
                                                 store, "--json"])
            ev = report["eval"]
            rows.append({"windows": n, "store": store, "rss_mb": rss, "seconds": seconds, "kld": ev["kld"],
                         "kld_se": ev["kld_stats"].get("kld_stderr", float("nan")), "ppl": ev["ppl"], "top1": ev["top1"]})
            print(rows[-1], flush=True)
    exact = {r["windows"]: r["kld"] for r in rows if r["store"] == "fp32"}
    lines = ["| windows | reference store | peak RSS MB | seconds | KLD | KLD vs fp32 store | PPL | top-1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = (r["kld"] - exact[r["windows"]]) / exact[r["windows"]]
        lines.append(f"| {r['windows']} | {r['store']} | {r['rss_mb']:.0f} | {r['seconds']:.0f} | {r['kld']:.5f} | "
                     f"{100 * rel:+.3f}% | {r['ppl']:.3f} | {r['top1']:.4f} |")
    title = "## Evaluation memory and the compact reference"
    text = (f"{title} ({time.strftime('%Y-%m-%d')}, 2 cores)\n\nCommand: `.venv/bin/python bench/eval_memory.py "
            f"--windows {args.windows}`. Checkpoint: `lowbit quantize --scheme W4A16 --group-size 128` (RTN) of the "
            "default model (its float weights are dequantized Q4_1, which flatters 4-bit KLDs; irrelevant to "
            "what is measured here). Each row is one `lowbit eval` process; peak RSS is that process's own. The "
            "original's log-probabilities are written to an anonymous temporary file (fp32 exact, or fp16) and "
            "read back a window at a time, so memory does not grow with windows x vocabulary.\n\n"
            + "\n".join(lines) + "\n")
    write_section(args.out, title, text)
    print(text)


if __name__ == "__main__":
    main()
