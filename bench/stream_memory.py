"""Peak memory of ``lowbit quantize --stream`` on a sharded model against the same run in memory.

    .venv/bin/python bench/stream_memory.py                 # smollm2, gptq, 128 x 512 calibration tokens
    .venv/bin/python bench/stream_memory.py --model path/to/hf_folder --calib-samples 6 --calib-length 64 \\
        --extra "--calib-text t.txt" --results /tmp/r.md    # a quick check on a small model

1. The model (``lowbit.model.load.load_model``: the default is a GGUF file, dequantized to float) is saved as a
   sharded Hugging Face folder (``save_pretrained(max_shard_size=--shard-size)``: model-0000k-of-0000n files and
   model.safetensors.index.json). A model loaded from GGUF refuses ``save_pretrained``, so a fresh model is
   built from its config and given its state dict first.
2. ``lowbit quantize COPY --method METHOD --no-eval`` runs twice, each in its own process: with ``--stream``
   and without. Each child's peak resident memory (its own ``ru_maxrss``, from ``os.wait4``) is reported beside
   the memory estimate the run printed (report.json ``memory_estimate``) and the issue's bound for a streamed
   run: one block in fp32 + the calibration activations + 1 GB. The sharded copy is removed afterwards
   (--keep keeps it); the two outputs and their logs stay in --dir (default bench/out_stream).
3. Every stored tensor of the two outputs (packed codes, scales, zero points, float tensors; across the
   streamed output's shards) is compared for equality. Exit code 1 on any difference.

Both runs get this process's environment (set OMP_NUM_THREADS to compare like with like).
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

from results_file import write_section

HERE = Path(__file__).resolve().parent
TITLE = "## Streamed quantization: peak memory"
GB = 10**9


def make_sharded_copy(model_name: str, folder: Path, shard_size: str) -> list[str]:
    """Save ``model_name`` as a sharded Hugging Face folder; returns the weight files written."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from lowbit.model.load import CAUSAL_LM, load_model

    loaded = load_model(model_name)
    auto = AutoModelForCausalLM if loaded.kind == CAUSAL_LM else AutoModel
    fresh = auto.from_config(loaded.model.config, dtype=torch.float32)  # a GGUF-loaded model refuses save_pretrained
    missing, unexpected = fresh.load_state_dict(loaded.model.state_dict(), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        sys.exit(f"the fresh model does not match {model_name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    fresh.tie_weights()
    if folder.exists():
        shutil.rmtree(folder)
    fresh.save_pretrained(str(folder), max_shard_size=shard_size)
    loaded.tokenizer.save_pretrained(str(folder))
    return sorted(p.name for p in folder.glob("*.safetensors"))


def run_measured(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` in its own process; returns (its peak RSS in MB of 10^6 bytes, seconds). A failure stops the
    benchmark."""
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} failed with exit code {proc.returncode}; see {log}")
    return usage.ru_maxrss * 1024 / 1e6, time.perf_counter() - t0  # ru_maxrss is in KiB on Linux


def stored_tensors(out: Path) -> dict:
    """Every tensor stored in a lowbit output, by name, across its shards."""
    from safetensors import safe_open

    from lowbit.model.checkpoint import WEIGHTS_FILE, weight_files

    tensors = {}
    for file in weight_files(out / WEIGHTS_FILE):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def differences(a: Path, b: Path) -> list[str]:
    """Names of the stored tensors that differ (or exist in one output only)."""
    import torch

    ta, tb = stored_tensors(a), stored_tensors(b)
    names = sorted(set(ta) | set(tb))
    return [n for n in names if n not in ta or n not in tb or ta[n].dtype != tb[n].dtype
            or not torch.equal(ta[n], tb[n])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="model to copy (default smollm2)")
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-length", type=int, default=512)
    parser.add_argument("--shard-size", default="100MB", help="shard size of the sharded copy (default 100MB)")
    parser.add_argument("--extra", default="", help="more quantize arguments, one shell-quoted string")
    parser.add_argument("--dir", type=Path, default=HERE / "out_stream")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS_stream.md")
    parser.add_argument("--keep", action="store_true", help="keep the sharded copy (the model in fp32) afterwards")

    parser.add_argument("--copy-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    copy = args.dir / "sharded-copy"
    if args.copy_only:
        make_sharded_copy(args.model, copy, args.shard_size)
        return 0
    # The copy is made in a child process: Linux carries a process's peak RSS across fork and exec, so a parent
    # that had loaded the model would hand its own peak to every measured child (ru_maxrss and lowbit's
    # report.json peak alike).
    subprocess.run([sys.executable, __file__, "--copy-only", "--model", args.model, "--shard-size", args.shard_size,
                    "--dir", str(args.dir)], check=True)
    shards = sorted(p.name for p in copy.glob("*.safetensors"))
    base = [sys.executable, "-m", "lowbit.cli", "quantize", str(copy), "--method", args.method, "--no-eval",
            "--json", "--force", "--calib-samples", str(args.calib_samples), "--calib-length", str(args.calib_length),
            *shlex.split(args.extra)]
    runs = {}
    for name, extra in (("streamed", ["--stream"]), ("in memory", [])):
        out = args.dir / name.replace(" ", "-")
        rss, seconds = run_measured(base + ["--out", str(out), *extra], args.dir / f"{out.name}.log")
        runs[name] = {"out": out, "rss_mb": rss, "seconds": seconds,
                      "report": json.loads((out / "report.json").read_text())}
    diff = differences(runs["streamed"]["out"], runs["in memory"]["out"])
    if not args.keep:
        shutil.rmtree(copy)
    text = render(args, shards, runs, diff)
    write_section(args.results, TITLE, text)
    print(text)
    return 1 if diff else 0


def render(args: argparse.Namespace, shards: list[str], runs: dict, diff: list[str]) -> str:
    """The results section: command, table, bound, and the comparison."""
    streamed = runs["streamed"]["report"]
    estimate = streamed["memory_estimate"]
    acts = estimate["calibration_activation_bytes"]
    bound = estimate["block_fp32_bytes"] + acts + GB
    rows = []
    for name, run in runs.items():
        est = run["report"].get("memory_estimate") or {}
        files = run["report"].get("weight_files", 1)
        rows.append(f"| {name} | {run['rss_mb']:.0f} | {est.get('bytes', 0) / 1e6:.0f} ({est.get('phase', '?')}) | "
                    f"{files} | {run['seconds']:.0f} |")
    lines = [
        TITLE, "",
        f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} .venv/bin/python bench/stream_memory.py "
        f"{shlex.join(sys.argv[1:])}`", "",
        f"Model {args.model} saved as a sharded folder ({len(shards)} files of at most {args.shard_size}); "
        f"`lowbit quantize COPY --method {args.method} --no-eval --calib-samples {args.calib_samples} "
        f"--calib-length {args.calib_length}`, with and without `--stream`, each in its own process.", "",
        "| run | peak RSS (MB = 10^6 bytes) | estimate (MB, peak phase) | weight files written | seconds |",
        "|---|---:|---:|---:|---:|", *rows, "",
        f"Bound for the streamed run (one block in fp32 {estimate['block_fp32_bytes'] / 1e6:.0f} MB + calibration "
        f"activations {acts / 1e6:.0f} MB + 1 GB): {bound / 1e6:.0f} MB; streamed peak "
        f"{runs['streamed']['rss_mb']:.0f} MB is {'within' if runs['streamed']['rss_mb'] * 1e6 <= bound else 'OVER'} it.",
        f"Streamed estimate, peak phase ({estimate['phase']}): "
        f"{', '.join(f'{k} {v / 1e6:.0f} MB' for k, v in estimate['parts'].items())}; every phase: "
        f"{', '.join(f'{k} {v / 1e6:.0f} MB' for k, v in estimate['phases'].items())}.", "",
        ("Stored tensors of the two outputs: identical." if not diff
         else f"Stored tensors of the two outputs: {len(diff)} DIFFER, e.g. {', '.join(diff[:5])}."), "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
