"""A 4-row ``lowbit compare`` sweep on the default model, in this process and as Ray tasks (issue 16, part 4).

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python bench/ray_sweep.py [--schemes W8A16,W4A16,W3A16,NVFP4]
        [--windows 4] [--ray-address HOST:6379] [--results bench/RESULTS_ray.md]

1. ``lowbit compare --schemes S1,S2,S3,S4 --no-sensitivity --windows W`` into a fresh bench/out_ray/in-process.
2. The same command with ``--ray`` (a local Ray instance started by the command, or --ray-address) into a fresh
   bench/out_ray/ray.
3. The row files of both compared: key and every field except the wall-clock ``seconds`` must be equal.

Both commands get this process's environment (so the same OMP_NUM_THREADS: CPU results can depend on the thread
count, and Ray gives each task OMP_NUM_THREADS=1 unless it is set). Seconds are wall time of the whole command,
Ray's start included. Writes a section of --results; exit code 1 when the rows differ.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results_file import write_section  # noqa: E402

OUT = Path("bench/out_ray")
TIMING_FIELDS = ("seconds",)  # lowbit.analysis.compare.TIMING_FIELDS, kept literal so the bench reads alone


def compare_command(args: argparse.Namespace, out: Path, ray: bool) -> list[str]:
    cmd = [sys.executable, "-m", "lowbit.cli", "compare", "--schemes", args.schemes, "--no-sensitivity",
           "--windows", str(args.windows), "--out", str(out)]
    if ray:
        cmd += ["--ray-address", args.ray_address] if args.ray_address else ["--ray"]
    return cmd


def timed_run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` into a fresh output folder (its output in ``log``); seconds of wall time."""
    out = Path(cmd[cmd.index("--out") + 1])
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"{shlex.join(cmd)} failed with exit code {code}; see {log}")
    return time.perf_counter() - t0


def kept_rows(out: Path) -> dict[str, dict]:
    """Row file name -> {"key", "row" without timings}."""
    rows = {}
    for path in sorted((out / "rows").glob("*.json")):
        data = json.loads(path.read_text())
        rows[path.name] = {"key": data["key"], "row": {k: v for k, v in data["row"].items() if k not in TIMING_FIELDS}}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default="W8A16,W4A16,W3A16,NVFP4", help="four RTN rows by default")
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows of 512 tokens (default 4)")
    parser.add_argument("--ray-address", help="a Ray cluster instead of a local instance")
    parser.add_argument("--results", default="bench/RESULTS_ray.md")
    args = parser.parse_args()
    args.load_before = os.getloadavg()
    OUT.mkdir(parents=True, exist_ok=True)
    runs = {}
    for label, ray in (("in-process", False), ("ray", True)):
        cmd = compare_command(args, OUT / label, ray)
        print(f"$ {shlex.join(cmd)}", flush=True)
        runs[label] = (cmd, timed_run(cmd, OUT / f"{label}.log"), kept_rows(OUT / label))
        print(f"  {runs[label][1]:.1f} s", flush=True)
    local, remote = runs["in-process"][2], runs["ray"][2]
    same = bool(local) and local == remote
    write_results(args, runs, same)
    print(f"rows identical (all but {', '.join(TIMING_FIELDS)}): {same}; wrote {args.results}")
    if not same:
        sys.exit(1)


def write_results(args: argparse.Namespace, runs: dict, same: bool) -> None:
    env = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}, nice {os.nice(0)}"
    load = ", ".join(" / ".join(f"{x:.1f}" for x in avg) for avg in (args.load_before, os.getloadavg()))
    rows = json.loads((OUT / "in-process" / "compare.json").read_text())["rows"]  # in the page's order
    timings = {label: {r["name"]: r["seconds"] for r in json.loads((OUT / label / "compare.json").read_text())["rows"]}
               for label in runs}
    lines = [
        "## Compare sweep in-process vs Ray (issue 16, part 4)", "",
        "Command: `" + shlex.join(["nice", "-n", "19", "env", "OMP_NUM_THREADS=1", ".venv/bin/python",
                                   "bench/ray_sweep.py", *sys.argv[1:]]) + "`", "",
        f"Machine: {os.cpu_count()} CPU cores shared with other work (load average over 1 / 5 / 15 min before "
        f"the first command, after the second: {load}); "
        f"both commands ran with {env}. Each command is timed whole: model loads, Ray's start (local instance, "
        "`--ray`) and its workers' imports included; the default model (SmolLM2-135M) is evaluated on "
        f"{args.windows} x 512 tokens per row, no sensitivity section.", "",
        "| run | command | seconds |", "|---|---|---:|",
    ]
    for label, (cmd, seconds, _) in runs.items():
        shown = shlex.join(["lowbit", *cmd[cmd.index("compare"):]])
        lines.append(f"| {label} | `{shown}` | {seconds:.1f} |")
    lines += ["", f"Rows identical (key and every field but `{', '.join(TIMING_FIELDS)}`): **{'yes' if same else 'NO'}**",
              "", "| row | bpw | PPL | KLD | top-1 | quantize s in-process | quantize s Ray |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | {r['kld']:.4f} | {r['top1']:.4f} | "
                     f"{timings['in-process'][r['name']]:.1f} | {timings['ray'][r['name']]:.1f} |")
    lines += ["", "With OMP_NUM_THREADS=1 the in-process run measures the rows one after another on one thread, "
              "while Ray runs two one-CPU tasks side by side on the two cores, each in its own worker process (its "
              "own model load and imports). On a loaded machine the ratio says little beyond that; the point is "
              "that the rows are the same.", ""]
    write_section(Path(args.results), "## Compare sweep in-process vs Ray (issue 16, part 4)", "\n".join(lines))


if __name__ == "__main__":
    main()
