"""Fuzzing lowbit's GGUF and safetensors readers with mutated real files: every case must end in the file loading
or a one-line LowbitError, never another exception or a hang.

Two small real files are written (a one-block Llama GGUF through gguf-py's GGUFWriter, a safetensors file
through safetensors.numpy; tests/model/untrusted_samples.py), then each case applies one to four seeded random
mutations (bit flips and byte writes in the header, edge-case integers over its length/count/type/dimension/offset
fields, inserted or deleted bytes, truncation anywhere) and runs what lowbit does with a user's file.
GGUF, stage "header": the bounded checks, gguf-py's reader with no safety net, every metadata value, the
tokenizer copy, ``lowbit inspect``; stage "load_model", on the cases whose header was read: transformers builds
config, tokenizer and model from the (mutated) metadata and the tensors are dequantized into it. Safetensors:
the checks, safe_open into torch, ``inspect``. Writes bench/RESULTS_fuzz.md.

    .venv/bin/python bench/fuzz_readers.py [--gguf-cases 100000] [--safetensors-cases 20000] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import logging
import random
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.errors import LowbitError  # noqa: E402
from tests.model.untrusted_samples import (CaseTimeout, gguf_seed, load_gguf_model, mutate, one_line,  # noqa: E402
                                           open_gguf_as_lowbit, open_safetensors_as_lowbit, random_mutations,
                                           safetensors_seed, time_limit, write_tiny_gguf, write_tiny_safetensors)

OUTCOMES = ("loaded", "LowbitError", "other exception", "timeout")


class Tally:
    """Outcome counts of one stage, its most frequent refusals, and the first case of each unexpected outcome."""

    def __init__(self, name: str):
        self.name, self.cases, self.seconds = name, 0, 0.0
        self.counts: collections.Counter = collections.Counter()
        self.refusals: collections.Counter = collections.Counter()
        self.unexpected: dict[str, tuple[int, list]] = {}

    def add(self, outcome: str, detail: str, case: int, mutations: list, seconds: float) -> None:
        self.cases += 1
        self.seconds += seconds
        self.counts[outcome] += 1
        if outcome == "LowbitError":
            self.refusals[" ".join(detail.split()[:4])] += 1
        elif outcome != "loaded":
            self.unexpected.setdefault(detail, (case, mutations))


def run_case(open_file, path: Path, limit_s: float) -> tuple[str, str, float]:
    """(outcome, detail, seconds) of one stage on one file."""
    t0 = time.perf_counter()
    try:
        with time_limit(limit_s):
            open_file(path)
        outcome, detail = "loaded", ""
    except LowbitError as exc:
        message = str(exc)
        if one_line(message):
            outcome, detail = "LowbitError", message.replace(str(path), "FILE").split(": ", 1)[-1]
        else:
            outcome, detail = "other exception", f"LowbitError of {len(message.splitlines())} lines: {message[:200]!r}"
    except CaseTimeout:
        outcome, detail = "timeout", f"past {limit_s} s"
    except Exception as exc:  # noqa: BLE001 -- what this bench counts
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        outcome = "other exception"
        detail = f"{type(exc).__name__}: {str(exc)[:160]!r} at {Path(frame.filename).name}:{frame.lineno}"
    seconds = time.perf_counter() - t0
    if outcome != "timeout" and seconds >= limit_s:  # CaseTimeout caught by code that catches Exception, re-raised
        outcome, detail = "timeout", f"past {limit_s} s, then {outcome}"  # as a LowbitError: still a timeout
    return outcome, detail, seconds


def fuzz(stages: list[tuple[Tally, object]], seed_path: Path, seed_of, cases: int, rng: random.Random,
         limit_s: float, work: Path) -> None:
    """Run ``cases`` mutated copies of the file through the stages in order; a case goes on to the next stage
    only if it loaded in the one before."""
    seed = seed_of(seed_path)
    path = work / f"case{seed_path.suffix}"
    for case in range(cases):
        mutations = random_mutations(rng, seed)
        path.write_bytes(mutate(seed, mutations))
        for tally, open_file in stages:
            outcome, detail, seconds = run_case(open_file, path, limit_s)
            tally.add(outcome, detail, case, mutations, seconds)
            if outcome != "loaded":
                break
        if (case + 1) % 5000 == 0:
            print(f"{seed_path.name}: {case + 1}/{cases} " + "; ".join(f"{t.name} {dict(t.counts)}" for t, _ in stages),
                  flush=True)


def report(tallies: list[Tally], sizes: dict[str, str], command: str, seed: int) -> str:
    lines = ["# Fuzzing the GGUF and safetensors readers", "", f"Command: `{command}`", "",
             f"Random seed {seed}. Each case: one to four mutations of a small real file's header (bit flips, byte "
             "writes, edge-case integers over length/count/type/dimension/offset fields, inserted or deleted "
             "bytes) or a truncation anywhere. GGUF `header`: bounded checks, gguf-py's reader with no safety net, "
             "every metadata value, the tokenizer copy, `lowbit inspect`; GGUF `load_model`: the cases whose "
             "header was read, through `load_model` (transformers builds config, tokenizer and model from the "
             "metadata). Safetensors: checks, safe_open into torch, `lowbit inspect`. " + "; ".join(
                 f"{k}: {v}" for k, v in sizes.items()) + ".", "",
             "| stage | cases | " + " | ".join(OUTCOMES) + " | seconds |", "|---" * (len(OUTCOMES) + 3) + "|"]
    for t in tallies:
        cells = " | ".join(str(t.counts[o]) for o in OUTCOMES)
        lines.append(f"| {t.name} | {t.cases} | {cells} | {t.seconds:.0f} |")
    for t in tallies:
        lines += ["", f"Most frequent refusals, {t.name} (first words of the problem the LowbitError names):", ""]
        lines += [f"- {n} x {text}" for text, n in t.refusals.most_common(10)]
        if t.unexpected:
            lines += ["", f"Unexpected outcomes, {t.name} ({len(t.unexpected)} distinct; the first case of each):", ""]
            lines += [f"- {detail} (case {i}: {m})" for detail, (i, m) in t.unexpected.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf-cases", type=int, default=100_000)
    parser.add_argument("--safetensors-cases", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-s", type=float, default=20.0, help="a case running longer counts as a timeout")
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS_fuzz.md"))
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # transformers' and torch's complaints about odd (mutated) metadata
    warnings.filterwarnings("ignore")
    rng = random.Random(args.seed)
    header, load, st = Tally("GGUF header"), Tally("GGUF load_model"), Tally("safetensors")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gguf_file = write_tiny_gguf(work / "tiny.gguf")
        st_file = write_tiny_safetensors(work / "tiny.safetensors")
        sizes = {"GGUF": f"{gguf_file.stat().st_size} bytes, header {gguf_seed(gguf_file).header_end}",
                 "safetensors": f"{st_file.stat().st_size} bytes, header {safetensors_seed(st_file).header_end}"}
        fuzz([(header, open_gguf_as_lowbit), (load, load_gguf_model)], gguf_file, gguf_seed, args.gguf_cases, rng,
             args.limit_s, work)
        fuzz([(st, open_safetensors_as_lowbit)], st_file, safetensors_seed, args.safetensors_cases, rng,
             args.limit_s, work)
    command = "python bench/fuzz_readers.py " + " ".join(sys.argv[1:])
    Path(args.out).write_text(report([header, load, st], sizes, command.strip(), args.seed))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
