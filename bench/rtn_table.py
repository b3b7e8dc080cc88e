"""Quality and size of data-free (RTN) integer schemes on the default model, one table.

The original model's outputs are computed once; each configuration quantizes a fresh copy, is written
as a real checkpoint (bits per weight are read from that file) and compared with the original on the
same evaluation windows as `lowbit quantize` (8 x 512 tokens of pydoc topics by default).

    .venv/bin/python bench/rtn_table.py [--windows 8] [--out bench/RESULTS.md] [--only LABEL --search minmax]

Load seconds are those of the one `load_model` call; peak RSS is the whole process's (ru_maxrss) after each
row, so it includes the loaded original, the copy being quantized and the evaluation.
"""

from __future__ import annotations

import argparse
import copy
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

from results_file import write_section

from lowbit.data.text import default_text, eval_windows, tokenize
from lowbit.eval.lm import compare_lm, lm_reference
from lowbit.eval.size import quantized_bits_per_weight
from lowbit.memory import give_large_blocks_back
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
    parser.add_argument("--only", action="append", help="run only the rows with this label (repeatable); "
                        "the rows go to a section of their own")
    parser.add_argument("--search", choices=("minmax", "mse"), help="run only this scale search")
    args = parser.parse_args()
    give_large_blocks_back()  # as the lowbit CLI does (lowbit.memory)
    t_load = time.perf_counter()
    loaded = load_model("smollm2")
    t_load = time.perf_counter() - t_load
    windows = eval_windows(tokenize(loaded.tokenizer, default_text()), args.windows, args.window_length)
    ref = lm_reference(loaded.model, windows.ids)
    rows = []
    for label, options in CONFIGS:
        if args.only and label not in args.only:
            continue
        for search in ("minmax", "mse"):
            if args.search and search != args.search:
                continue
            model = copy.deepcopy(loaded.model)
            recipe = build_recipe(QuantizeOptions(scale_search=search, **options))
            qm = quantize_model(model, recipe)
            qm_seconds = qm.seconds
            with tempfile.TemporaryDirectory() as tmp:
                write_checkpoint(qm, Path(tmp), model.config, loaded.tokenizer, {})
                bpw = quantized_bits_per_weight(Path(tmp) / WEIGHTS_FILE)
                size = (Path(tmp) / WEIGHTS_FILE).stat().st_size
            m = compare_lm(model, ref)
            del model, qm
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append((label, search, bpw, size, m, qm_seconds, t_load, peak))
            print(rows[-1], file=sys.stderr)
    _write(args, rows, ref.ppl)


def _write(args, rows, ppl_base) -> None:
    if args.out == "bench/RESULTS.md" and len(sys.argv) == 1:
        command = "make bench` (= `.venv/bin/python bench/rtn_table.py"
    else:
        command = ".venv/bin/python " + shlex.join(sys.argv)
    title = "## RTN integer schemes on SmolLM2-135M (default model)"
    if args.only or args.search:
        title += f" - only {', '.join(args.only or ['all'])} ({args.search or 'both searches'})"
    lines = [
        title,
        "",
        f"Command: `{command}`, "
        f"{args.windows} windows x {args.window_length} tokens of pydoc topics; original PPL {ppl_base:.3f}. "
        "The default model's float weights are dequantized Q4_1 (asym 4-bit, blocks of 32), so 4-bit "
        "asymmetric grids look better here than on a true float model. Size = model.safetensors "
        "(embeddings, tied lm_head and norms in fp16). Load s = the one load of the model (GGUF parse, "
        "dequantization, tokenizer); peak RSS = the process's peak after the row (loaded original + the copy "
        "being quantized + evaluation), on the shared 2-core machine.",
        "",
        "| scheme | scale search | bpw | size MB | PPL | KLD | top-1 | quantize s | load s | peak RSS MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, search, bpw, size, m, tq, tl, peak in rows:
        lines.append(f"| {label} | {search} | {bpw:.3f} | {size / 1e6:.1f} | {m['ppl']:.3f} | {m['kld']:.4f} "
                     f"| {m['top1']:.4f} | {tq:.1f} | {tl:.1f} | {peak:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(Path(args.out), lines[0], text)


if __name__ == "__main__":
    main()
