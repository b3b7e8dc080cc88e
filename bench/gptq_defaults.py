"""Which GPTQ configuration should ``--method gptq`` be? KLD against RTN on held-out text, W4A16 and W3A16 g128.

Every configuration quantizes a fresh copy of the default model's float weights with the same calibration windows
(``--calib-samples`` x 512 tokens of pydoc topics after the evaluation windows, the CLI's defaults, bf16 passes
where the CPU has them) and is compared with the original on two texts: the first 8 x 512 tokens of pydoc topics
('default', the calibration text's kind) and 8 x 512 tokens of standard-library module docstrings ('held-out', a
kind of text no default was chosen on). The ratio column is KLD / RTN's KLD on held-out text, same scheme.
Configurations are given as ``label=key:value,...`` over QuantizeOptions fields and GPTQ options (act_order,
damp, static_groups), e.g. ``'gptq act-order=method:gptq,act_order:1'``; ``defaults`` is what the CLI does.

    .venv/bin/python bench/gptq_defaults.py [--schemes W4A16,W3A16] [--calib-samples 128] [--configs ...]

The default model's float weights are dequantized Q4_1 (asymmetric 4-bit, blocks of 32): asymmetric 4-bit grids
look better on it than they would on a true float model. Writes a section of bench/RESULTS.md after every row.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from budget_table import held_out_text  # noqa: E402
from results_file import write_section  # noqa: E402

from lowbit.data.text import calibration_windows, default_text, eval_windows, load_text, tokenize  # noqa: E402
from lowbit.eval.lm import compare_lm, lm_reference  # noqa: E402
from lowbit.model.apply import quantize_model  # noqa: E402
from lowbit.model.load import load_model  # noqa: E402
from lowbit.pipeline.calibrated import quantize_calibrated  # noqa: E402
from lowbit.workflow import QuantizeOptions, build_recipe, cpu_has_bf16, recipe_needs_calibration  # noqa: E402

CONFIGS = ("rtn=method:rtn", "gptq (CLI defaults)=method:gptq", "gptq no act-order=method:gptq,act_order:0,scale_search:minmax",
           "gptq act-order=method:gptq,act_order:1,scale_search:minmax",
           "gptq act-order mse=method:gptq,act_order:1,scale_search:mse",
           "awq+gptq act-order=method:awq+gptq,act_order:1,scale_search:minmax")
GPTQ_KEYS = ("act_order", "damp", "static_groups", "clip_objective", "true_sequential")
TITLE = "## GPTQ defaults: KLD against RTN on held-out text (SmolLM2-135M, {schemes})"


def parse_config(text: str) -> tuple[str, dict, dict]:
    """'label=key:value,...' -> (label, QuantizeOptions fields, GPTQ options)."""
    label, _, body = text.partition("=")
    fields, gptq = {}, {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition(":")
        if key in GPTQ_KEYS:
            gptq[key] = float(value) if key == "damp" else value if key == "clip_objective" else bool(int(value))
        else:
            fields[key] = value
    return label, fields, gptq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", default="W4A16,W3A16")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--out", default="bench/RESULTS.md")
    args = parser.parse_args()
    loaded = load_model("smollm2")
    ids = tokenize(loaded.tokenizer, default_text())
    ev = eval_windows(ids, 8, 512)
    held = eval_windows(tokenize(loaded.tokenizer, load_text(held_out_text())), 8, 512)
    calib = calibration_windows(ids, args.calib_samples, 512, ev.n_tokens).ids
    refs = {"default": lm_reference(loaded.model, ev.ids, progress=False),
            "held-out": lm_reference(loaded.model, held.ids, progress=False)}
    dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
    rows = []
    for scheme in args.schemes.split(","):
        for label, fields, gptq in map(parse_config, args.configs):
            model = copy.deepcopy(loaded.model)
            opts = QuantizeOptions(scheme=scheme, group_size=128, **fields,
                                   method_options=tuple(gptq.items()))
            recipe = build_recipe(opts)
            t0 = time.perf_counter()
            if recipe_needs_calibration(recipe):
                quantize_calibrated(model, recipe, calib, progress=False, compute_dtype=dtype)
            else:
                quantize_model(model, recipe, progress=False)
            seconds = time.perf_counter() - t0
            kld = {text: compare_lm(model, ref, progress=False)["kld"] for text, ref in refs.items()}
            rows.append((scheme, label, kld, seconds))
            print(scheme, label, kld, f"{seconds:.0f}s", file=sys.stderr, flush=True)
            del model
            _write(args, rows, dtype)


def _write(args, rows, dtype) -> None:
    rtn = {scheme: kld["held-out"] for scheme, label, kld, _ in rows if label == "rtn"}
    title = TITLE.format(schemes=args.schemes.replace(",", ", "))
    lines = [title, "",
             f"Command: `python {' '.join(sys.argv)}`. {args.calib_samples} x 512 calibration tokens of pydoc topics "
             f"after the evaluation windows, {'bf16' if dtype == torch.bfloat16 else 'fp32'} calibration passes; KLD "
             "on 8 x 512 tokens of pydoc topics ('default') and of standard-library module docstrings ('held-out', "
             "never used to choose anything). Ratio: KLD / RTN's on held-out text, same scheme. The default model's "
             "float weights are dequantized Q4_1, which flatters asymmetric 4-bit grids. Seconds: quantization only, "
             "on the shared 2-core machine (rough).", "",
             "| scheme (g128, CLI defaults otherwise) | config | KLD default | KLD held-out | held-out / RTN | seconds |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for scheme, label, kld, seconds in rows:
        ratio = f"{kld['held-out'] / rtn[scheme]:.3f}" if scheme in rtn else "-"
        lines.append(f"| {scheme} | {label} | {kld['default']:.4f} | {kld['held-out']:.4f} | {ratio} | {seconds:.0f} |")
    write_section(Path(args.out), title, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
