"""GPTQ speed, lowbit vs GPTQModel, on the same float SmolLM2-135M and the same calibration tokens.

    .venv/bin/python bench/gptq_speed.py prepare --dir /tmp/gptq-speed [--samples 64]
    GPTQMODEL_CPU_WORKERS=2 /path/to/gptqmodel-venv/bin/python bench/gptqmodel_run.py /tmp/gptq-speed
    .venv/bin/python bench/gptq_speed.py lowbit --dir /tmp/gptq-speed
    .venv/bin/python bench/gptq_speed.py report --dir /tmp/gptq-speed      # writes bench/RESULTS.md

`prepare` writes the float model as a Hugging Face folder (built fresh from the GGUF-loaded weights) and
the calibration windows (the same ones `lowbit quantize` draws: after the 8 x 512 evaluation tokens).
Both runs quantize W4 g128 (symmetric, no act-order) and time only the quantization.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from results_file import write_section

import torch
from safetensors.torch import load_file, save_file


def prepare(d: Path, samples: int, length: int) -> None:
    from lowbit.data.text import calibration_windows, default_text, tokenize
    from lowbit.model.load import load_model

    loaded = load_model("smollm2")
    model_dir = d / "model"
    loaded.model.save_pretrained(str(model_dir), safe_serialization=True)
    loaded.tokenizer.save_pretrained(str(model_dir))
    ids = calibration_windows(tokenize(loaded.tokenizer, default_text()), samples, length, eval_tokens=8 * 512).ids
    save_file({"input_ids": ids.contiguous()}, str(d / "calibration.safetensors"))


def run_lowbit(d: Path, dtype: str) -> None:
    from lowbit.model.load import load_model
    from lowbit.pipeline.calibrated import quantize_calibrated
    from lowbit.workflow import QuantizeOptions, build_recipe

    ids = load_file(str(d / "calibration.safetensors"))["input_ids"]
    loaded = load_model(str(d / "model"))
    recipe = build_recipe(QuantizeOptions(scheme="W4A16", group_size=128, symmetric=True, method="gptq"))
    t0 = time.perf_counter()
    qm = quantize_calibrated(loaded.model, recipe, ids, progress=True,
                             compute_dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    seconds = time.perf_counter() - t0
    result = {"tool": f"lowbit gptq ({dtype} calibration passes)", "seconds": seconds, "samples": int(ids.shape[0]),
              "length": int(ids.shape[1]), "tensors": len(qm.qtensors), "peak_rss_mb": qm.peak_rss_mb}
    (d / f"lowbit-{dtype}.json").write_text(json.dumps(result, indent=2))
    print(result)


def report(d: Path, out: Path, note: str = "") -> None:
    results = [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))]
    peers = [r for r in results if r["tool"].startswith("GPTQModel")]
    peer = next((r for r in peers if "fp32" in r["tool"]), peers[0] if peers else None)
    title = "## GPTQ speed: lowbit vs GPTQModel (W4 g128, SmolLM2-135M, CPU)"
    lines = [title, "", "Commands: see `bench/gptq_speed.py` (prepare, gptqmodel_run.py, lowbit, report). Same float "
             "weights, same calibration token windows; seconds of quantization only, measured one after the other on "
             f"the 2-core machine ({_cpu_name()}). GPTQModel picks bf16 on CPU unless pinned; on a CPU without native "
             "bf16 (no AVX512-BF16/AMX) bf16 products are several times slower, so the like-for-like rows are the "
             "ones with the same dtype. The speed-up column is against "
             f"{peer['tool'] if peer else 'GPTQModel'}.", "",
             "| tool | samples x length | seconds | speed-up |", "| --- | --- | ---: | ---: |"]
    for r in results:
        ratio = f"{peer['seconds'] / r['seconds']:.2f}x" if peer and r is not peer else "-"
        lines.append(f"| {r['tool']} | {r['samples']} x {r['length']} | {r['seconds']:.0f} | {ratio} |")
    if note:
        lines += ["", note]
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(out, title, text)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("prepare", "lowbit", "report"))
    parser.add_argument("--dir", type=Path, default=Path("/tmp/gptq-speed"))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--out", type=Path, default=Path("bench/RESULTS.md"))
    parser.add_argument("--note", default="", help="report: a line on the conditions of the runs")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.step == "prepare":
        prepare(args.dir, args.samples, args.length)
    elif args.step == "lowbit":
        run_lowbit(args.dir, args.dtype)
    else:
        report(args.dir, args.out, args.note)


if __name__ == "__main__":
    main()
