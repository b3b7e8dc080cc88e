"""Quality and size of data-free (RTN) integer schemes on the default model, one table.

The original model's outputs are computed once; each configuration quantizes a fresh copy, is written
as a real checkpoint (bits per weight are read from that file) and compared with the original on the
same evaluation windows as `lowbit quantize` (8 x 512 tokens of pydoc topics by default).

    .venv/bin/python bench/rtn_table.py [--windows 8] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

from results_file import write_section

from lowbit.data.text import default_text, eval_windows, tokenize
from lowbit.eval.lm import compare_lm, lm_reference
from lowbit.eval.size import quantized_bits_per_weight
from lowbit.model.apply import quantize_model
from lowbit.model.checkpoint import WEIGHTS_FILE, write_checkpoint
from lowbit.model.load import load_model
from lowbit.workflow import QuantizeOptions, build_recipe

CONFIGS = [
    ("W8A16 (int8 channel)", dict(scheme="W8A16")),
    ("W4A16 g128 sym", dict(scheme="W4A16", group_size=128, symmetric=True)),
    ("W4A16 g128 asym", dict(scheme="W4A16", group_size=128, symmetric=False)),
    ("W3A16 g128 asym", dict(scheme="W3A16", group_size=128, symmetric=False)),
    ("W2A16 g64 asym", dict(scheme="W2A16", group_size=64, symmetric=False)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window-length", type=int, default=512)
    parser.add_argument("--out", default="bench/RESULTS.md")
    args = parser.parse_args()
    loaded = load_model("smollm2")
    windows = eval_windows(tokenize(loaded.tokenizer, default_text()), args.windows, args.window_length)
    ref = lm_reference(loaded.model, windows.ids)
    rows = []
    for label, options in CONFIGS:
        for search in ("minmax", "mse"):
            model = copy.deepcopy(loaded.model)
            recipe = build_recipe(QuantizeOptions(scale_search=search, **options))
            qm = quantize_model(model, recipe)
            with tempfile.TemporaryDirectory() as tmp:
                write_checkpoint(qm, Path(tmp), model.config, loaded.tokenizer, {})
                bpw = quantized_bits_per_weight(Path(tmp) / WEIGHTS_FILE)
                size = (Path(tmp) / WEIGHTS_FILE).stat().st_size
            t0 = time.perf_counter()
            m = compare_lm(model, ref)
            rows.append((label, search, bpw, size, m, qm.seconds, time.perf_counter() - t0))
            print(rows[-1], file=sys.stderr)
    _write(args, rows, ref.ppl)


def _write(args, rows, ppl_base) -> None:
    command = "make bench" if args.out == "bench/RESULTS.md" else " ".join(sys.argv)
    lines = [
        "## RTN integer schemes on SmolLM2-135M (default model)",
        "",
        f"Command: `{command}` (= `.venv/bin/python bench/rtn_table.py`), "
        f"{args.windows} windows x {args.window_length} tokens of pydoc topics; original PPL {ppl_base:.3f}. "
        "The default model's float weights are dequantized Q4_1 (asym 4-bit, blocks of 32), so 4-bit "
        "asymmetric grids look better here than on a true float model. Size = model.safetensors "
        "(embeddings, tied lm_head and norms in fp16).",
        "",
        "| scheme | scale search | bpw | size MB | PPL | KLD | top-1 | quantize s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, search, bpw, size, m, tq, _ in rows:
        lines.append(f"| {label} | {search} | {bpw:.3f} | {size / 1e6:.1f} | {m['ppl']:.3f} | {m['kld']:.4f} "
                     f"| {m['top1']:.4f} | {tq:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(Path(args.out), lines[0], text)


if __name__ == "__main__":
    main()
