"""Every number-format scheme on the built-in encoder all-MiniLM-L6-v2, through the same job as the CLI.

Each scheme runs ``lowbit quantize minilm --scheme S`` (RTN, written to a temporary folder, evaluated on 256
pydoc paragraphs: cosine of mean-pooled embeddings to the original's). Writes a section of
bench/RESULTS_formats.md.

    .venv/bin/python bench/formats_minilm.py [--schemes FP8,NVFP4] [--out bench/RESULTS_formats.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from results_file import write_section

from lowbit.workflow import QuantizeOptions, quantize_job

SCHEMES = ("W8A16", "FP8", "MXFP8", "NVFP4", "MXFP4", "FP4", "NF4", "NF4-DQ", "W4A16", "LOG2", "TERNARY", "BINARY")
TITLE = "## Every format scheme on all-MiniLM-L6-v2 (encoder, RTN)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--out", default="bench/RESULTS_formats.md")
    args = parser.parse_args()
    rows = []
    for scheme in args.schemes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            report, _ = quantize_job(QuantizeOptions(model="minilm", scheme=scheme, out=f"{tmp}/q"), progress=False)
        rows.append((scheme, report))
        print(scheme, report["spec"], report["bits_per_weight"], report["eval"]["cosine"], file=sys.stderr, flush=True)
    lines = [TITLE, "", f"Command: `python {' '.join(sys.argv)}` (each row = `lowbit quantize minilm --scheme S`). "
             "256 pydoc paragraphs (max 128 tokens), cosine of mean-pooled embeddings to the fp32 original's. "
             "bpw counts codes, scales and global scales of the quantized linears; size = model.safetensors "
             "(embeddings and norms in fp16).", "",
             "| scheme | spec | bpw | size MB | mean cosine | min cosine | quantize s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for scheme, r in rows:
        lines.append(f"| {scheme} | `{r['spec']}` | {r['bits_per_weight']:.3f} | {r['size_bytes'] / 1e6:.1f} | "
                     f"{r['eval']['cosine']:.4f} | {r['eval']['cosine_min']:.4f} | {r['seconds']['quantize']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(Path(args.out), TITLE, text)


if __name__ == "__main__":
    main()
