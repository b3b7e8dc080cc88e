"""Kill -9 and ``lowbit quantize --resume``: the resumed output is byte-identical to an uninterrupted run's.

    .venv/bin/python bench/resume_check.py                       # smollm2, gptq, 16 samples, kills after 3, 15, 28
    .venv/bin/python bench/resume_check.py --model path/to/hf_folder --kill-after 1,2 --results /tmp/r.md

1. ``lowbit quantize MODEL --method METHOD --calib-samples N --no-eval`` once, uninterrupted, into DIR/full.
2. The same command into DIR/resumed, killed with SIGKILL as soon as its state folder (DIR/resumed.calib-state)
   shows K blocks finished, plus a random 0..--jitter seconds so the kill lands anywhere in the next block;
   restarted with ``--resume`` for each K of --kill-after in turn, and finally run with ``--resume`` to the end.
3. Every output file except report.json (timings, memory) compared byte for byte; the section written to
   --results (default bench/RESULTS_resume.md) gives the command, the kills and the comparison. Exit code 1 on
   any difference.

Both runs get this process's environment, so the same thread count (CPU results may depend on it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from results_file import write_section

HERE = Path(__file__).resolve().parent
SKIP = {"report.json"}  # timings and peak memory differ from run to run by design


def lowbit_command(args: argparse.Namespace, out: Path) -> list[str]:
    """The quantize command both runs use (``--out`` aside)."""
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", args.model, "--method", args.method,
           "--calib-samples", str(args.calib_samples), "--no-eval", "--json", "--out", str(out)]
    return cmd + shlex.split(args.extra)


def run_to_end(cmd: list[str], log: Path, timeout: float) -> float:
    """Run ``cmd`` to completion (its output in ``log``); returns seconds. A failure stops the check."""
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    if code != 0:
        sys.exit(f"{shlex.join(cmd)} failed with exit code {code}; see {log}")
    return time.perf_counter() - t0


def blocks_done(state_json: Path) -> int:
    """Finished blocks recorded in a state folder's state.json (0 when there is none yet)."""
    try:
        return int(json.loads(state_json.read_text())["blocks_done"])
    except (OSError, ValueError, KeyError):
        return 0


def run_and_kill(cmd: list[str], state_json: Path, after: int, jitter: float, rng: random.Random, log: Path,
                 timeout: float) -> dict:
    """Start ``cmd``, SIGKILL it once ``after`` blocks are finished (plus a random delay); what happened."""
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        try:
            while blocks_done(state_json) < after and proc.poll() is None:
                if time.perf_counter() - t0 > timeout:
                    sys.exit(f"timed out waiting for {after} finished blocks; see {log}")
                time.sleep(0.02)
            delay = rng.uniform(0, jitter)
            time.sleep(delay)
            finished_early = proc.poll() is not None
            if not finished_early:
                os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
    if finished_early:
        sys.exit(f"the run ended (exit code {proc.returncode}) before it could be killed after {after} blocks; "
                 f"choose earlier --kill-after points; see {log}")
    return {"after_blocks": after, "delay_s": round(delay, 3), "blocks_done_at_kill": blocks_done(state_json),
            "seconds": round(time.perf_counter() - t0, 1), "returncode": proc.returncode}


def compare(full: Path, resumed: Path) -> list[dict]:
    """One row per output file: its size and whether both runs wrote the same bytes."""
    names = sorted({p.name for p in full.iterdir()} | {p.name for p in resumed.iterdir()})
    rows = []
    for name in names:
        a, b = full / name, resumed / name
        same = a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()
        rows.append({"file": name, "bytes": a.stat().st_size if a.is_file() else None,
                     "identical": "skipped (timings)" if name in SKIP else ("yes" if same else "NO")})
    return rows


def section(args: argparse.Namespace, cmd: list[str], kills: list[dict], seconds: dict, rows: list[dict],
            state_removed: bool) -> str:
    """The results section: commands, verdict, one row per kill, one row per output file."""
    identical = all(r["identical"] != "NO" for r in rows)
    shown = ["lowbit", *cmd[3:]]  # [python, -m, lowbit.cli, quantize, ...]
    lines = [f"## Kill -9 and --resume: byte-identical output ({args.model}, {args.method}, "
             f"{args.calib_samples} calibration samples)", "",
             "```", f"python bench/resume_check.py {shlex.join(sys.argv[1:])}", "```", "",
             "Quantize command (both runs; `--out` differs, the resumed one adds `--resume` after each kill):",
             "", "```", shlex.join(shown), "```", "",
             f"Result: **{'byte-identical' if identical else 'DIFFERENT'}**; the state folder "
             f"{'was removed' if state_removed else 'WAS LEFT BEHIND'} after the last run. Uninterrupted run "
             f"{seconds['full']:.1f} s; killed and resumed runs {seconds['resumed']:.1f} s in all.", "",
             "| kill | after blocks | extra delay s | blocks done at kill | run s | exit |",
             "|---|---|---|---|---|---|"]
    for i, k in enumerate(kills, 1):
        lines.append(f"| {i} | {k['after_blocks']} | {k['delay_s']} | {k['blocks_done_at_kill']} | {k['seconds']} | "
                     f"{k['returncode']} (SIGKILL) |")
    lines += ["", "| file | bytes | identical |", "|---|---|---|"]
    lines += [f"| {r['file']} | {r['bytes']} | {r['identical']} |" for r in rows]
    return "\n".join(lines) + "\n"


def kill_and_resume(args: argparse.Namespace, kill_after: list[int], out: Path, state_json: Path,
                    log: Path) -> list[dict]:
    """Run into ``out``, killed at each point of ``kill_after`` and resumed, then resumed to the end."""
    rng, kills = random.Random(0), []
    for i, after in enumerate(kill_after):
        cmd = lowbit_command(args, out) + (["--resume"] if i else [])
        kills.append(run_and_kill(cmd, state_json, after, args.jitter, rng, log, args.timeout))
        print(f"killed: {kills[-1]}", flush=True)
    run_to_end(lowbit_command(args, out) + ["--resume"], log, args.timeout)
    return kills


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="model argument of lowbit quantize (default smollm2)")
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--kill-after", default="3,15,28", help="finished-block counts to kill at, increasing")
    parser.add_argument("--jitter", type=float, default=1.0, help="random extra seconds before each kill (seed 0)")
    parser.add_argument("--extra", default="", help="more lowbit quantize arguments, e.g. '--scheme W3A16 --asym'")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/lowbit-resume-check"), help="scratch folder (emptied "
                        "first; default /tmp/lowbit-resume-check)")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds allowed per run")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS_resume.md")
    args = parser.parse_args()
    kill_after = [int(k) for k in args.kill_after.split(",") if k.strip()]
    if kill_after != sorted(set(kill_after)) or not kill_after or kill_after[0] < 1:
        parser.error("--kill-after takes increasing positive block counts")
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    full, resumed, log = args.dir / "full", args.dir / "resumed", args.dir / "log.txt"
    state_json = resumed.with_name(resumed.name + ".calib-state") / "state.json"

    seconds = {"full": run_to_end(lowbit_command(args, full), log, args.timeout)}
    t0 = time.perf_counter()
    kills = kill_and_resume(args, kill_after, resumed, state_json, log)
    seconds["resumed"] = time.perf_counter() - t0

    rows = compare(full, resumed)
    removed = not state_json.parent.exists()
    ok = removed and all(r["identical"] != "NO" for r in rows)
    text = section(args, lowbit_command(args, Path("OUT")), kills, seconds, rows, removed)
    write_section(args.results, text.split("\n")[0], text)
    print(f"{'byte-identical' if ok else 'DIFFERENT'}; wrote {args.results}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
