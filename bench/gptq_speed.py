"""GPTQ speed, lowbit vs GPTQModel, on the same float SmolLM2-135M and the same calibration tokens.

    .venv/bin/python bench/gptq_speed.py prepare --dir /tmp/gptq-speed [--samples 64]
    GPTQMODEL_CPU_WORKERS=2 /path/to/gptqmodel-venv/bin/python bench/gptqmodel_run.py /tmp/gptq-speed [auto|fp32] [act-order]
    .venv/bin/python bench/gptq_speed.py lowbit --dir /tmp/gptq-speed [--dtype auto|fp32|bf16] [--act-order] [--two-pass]
    .venv/bin/python bench/gptq_speed.py report --dir /tmp/gptq-speed      # writes bench/RESULTS.md

Pairs: this machine's speed drifts by 15% and more within an hour, so one GPTQModel run against one lowbit
run is one sample of the ratio. Copy each back-to-back pair's two result files into ``DIR/pairs/NAME/``;
``report`` then adds a row per pair (the two runs of a pair were taken minutes apart, each alone).

`prepare` writes the float model as a Hugging Face folder (built fresh from the GGUF-loaded weights) and
the calibration windows (the same ones `lowbit quantize` draws: after the 8 x 512 evaluation tokens).
Both runs quantize W4 g128 symmetric, with or without activation order (GPTQModel's desc_act, lowbit's
act_order: lowbit's default since the defaults table, bench/gptq_defaults.py) and time only the quantization.
``--dtype auto`` is what ``lowbit quantize`` does: bf16 passes where the CPU has native bf16, else fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def run_lowbit(d: Path, dtype: str, act_order: bool, two_pass: bool = False) -> None:
    from lowbit.methods import GPTQ_DEFAULT_OPTIONS
    from lowbit.model.load import load_model
    from lowbit.pipeline.calibrated import quantize_calibrated
    from lowbit.workflow import QuantizeOptions, build_recipe, cpu_has_bf16

    if dtype == "auto":
        dtype = "bf16" if cpu_has_bf16() else "fp32"
    ids = load_file(str(d / "calibration.safetensors"))["input_ids"]
    loaded = load_model(str(d / "model"))
    recipe = build_recipe(QuantizeOptions(scheme="W4A16", group_size=128, symmetric=True, method="gptq",
                                          method_options=(("act_order", act_order), ("true_sequential", not two_pass))))
    t0 = time.perf_counter()
    qm = quantize_calibrated(loaded.model, recipe, ids, progress=True,
                             compute_dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    seconds = time.perf_counter() - t0
    order = "act-order" if act_order else "no act-order"
    search = recipe.rules[-1].spec.scale_search
    passes = "one pass per block" if recipe.options.get("true_sequential", GPTQ_DEFAULT_OPTIONS["true_sequential"]) \
        else "two passes per block"
    result = {"tool": f"lowbit gptq ({dtype} calibration passes, {order}, {search} scales, {passes})", "seconds": seconds,
              "samples": int(ids.shape[0]), "length": int(ids.shape[1]), "tensors": len(qm.qtensors),
              "peak_rss_mb": qm.peak_rss_mb}
    (d / f"lowbit-{dtype}-{'act' if act_order else 'plain'}{'-2pass' if two_pass else ''}.json").write_text(json.dumps(result, indent=2))
    print(result)


TITLE = "## GPTQ speed: lowbit vs GPTQModel (W4 g128, SmolLM2-135M"


def report(d: Path, out: Path, note: str = "") -> None:
    results = [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))]
    title = f"{TITLE}, {_cpu_class()})"
    lines = [title, "", "Commands: see `bench/gptq_speed.py` (prepare, gptqmodel_run.py, lowbit, report). Same float "
             "weights, same calibration token windows; seconds of quantization only, measured one after the other on "
             f"the 2-core machine ({_cpu_name()}). GPTQModel picks bf16 on CPU unless pinned (fp32). Speed-up: "
             "against the fastest GPTQModel run with the same activation-order setting.", "",
             "| tool | samples x length | seconds | speed-up |", "| --- | --- | ---: | ---: |"]
    for r in results:
        order = _order(r)
        peers = [p for p in results if p["tool"].startswith("GPTQModel") and _order(p) == order]
        peer = min(peers, key=lambda p: p["seconds"]) if peers else None
        ratio = f"{peer['seconds'] / r['seconds']:.2f}x" if peer and not r["tool"].startswith("GPTQModel") else "-"
        lines.append(f"| {r['tool']} | {r['samples']} x {r['length']} | {r['seconds']:.0f} | {ratio} |")
    lines += _pair_rows(d)
    if note:
        lines += ["", note]
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(out, title, text)


def _pair_rows(d: Path) -> list[str]:
    """A table of the back-to-back pairs under ``d/pairs`` (one GPTQModel and one lowbit result file each)."""
    pairs = []
    for folder in sorted(p for p in (d / "pairs").glob("*") if p.is_dir()):
        runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        peer = [r for r in runs if r["tool"].startswith("GPTQModel")]
        ours = [r for r in runs if r["tool"].startswith("lowbit")]
        if len(peer) == 1 and len(ours) == 1:
            pairs.append((folder.name, peer[0]["tool"], peer[0]["seconds"], ours[0]["tool"], ours[0]["seconds"]))
    if not pairs:
        return []
    rows = ["", "Back-to-back pairs (each run alone on the machine):", "",
            "| pair | GPTQModel run | s | lowbit run | s | speed-up |", "| --- | --- | ---: | --- | ---: | ---: |"]
    rows += [f"| {name} | {peer_tool} | {peer:.0f} | {tool} | {ours:.1f} | {peer / ours:.2f}x |"
             for name, peer_tool, peer, tool, ours in pairs]
    median = statistics.median(peer / ours for _, _, peer, _, ours in pairs)
    return rows + ["", f"Median speed-up over {len(pairs)} pairs: {median:.2f}x."]


def _order(result: dict) -> str:
    return "no act-order" if "no act-order" in result["tool"] else "act-order"


def _cpu_class() -> str:
    """Native bf16 or not: it decides lowbit's pass dtype and GPTQModel's fastest one, so each class keeps its own
    results section."""
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return "CPU with avx512_bf16" if "avx512_bf16" in flags else "CPU without native bf16"


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
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--act-order", action="store_true", help="lowbit: GPTQ with activation order")
    parser.add_argument("--two-pass", action="store_true", help="lowbit: true_sequential off (observe, then propagate)")
    parser.add_argument("--out", type=Path, default=Path("bench/RESULTS.md"))
    parser.add_argument("--note", default="", help="report: a line on the conditions of the runs")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.step == "prepare":
        prepare(args.dir, args.samples, args.length)
    elif args.step == "lowbit":
        run_lowbit(args.dir, args.dtype, args.act_order, args.two_pass)
    else:
        report(args.dir, args.out, args.note)


if __name__ == "__main__":
    main()
