"""Shared steps of the exporter tests: a lowbit checkpoint from the CLI, a QTensor of constant codes, and the
check that a refused export fails in one line and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.cli import main
from lowbit.formats import parse_spec
from lowbit.formats.qtensor import QTensor


def quantize_folder(model_dir: Path, out: Path, args: list[str]) -> Path:
    """``lowbit quantize MODEL ARGS --out OUT`` without evaluation; returns OUT. The token embedding stays in
    float unless ARGS say ``--embeddings`` (the tiny Llama's is 25% of its weights, so by default it would be
    int8), so that these tests check the exporters' linears; tests/export/test_embeddings_export.py covers
    quantized embeddings."""
    if "--embeddings" not in args:
        args = [*args, "--embeddings", "keep"]
    assert main(["quantize", str(model_dir), *args, "--out", str(out), "--no-eval", "--json"]) == 0
    return out


def constant_qtensor(spec: str, rows: int, cols: int, zero: int | None) -> QTensor:
    """A (rows, cols) QTensor of zero codes, scales 0.5 and zero points ``zero`` (None: symmetric)."""
    s = parse_spec(spec)
    n_groups = -(-cols // s.group_size) if s.granularity == "group" else 1
    scales = torch.full((rows, n_groups), 0.5, dtype=torch.float16)
    zeros = None if zero is None else torch.full((rows, n_groups), zero, dtype=torch.int16)
    codes = torch.zeros(rows, cols, dtype=torch.int16)
    return QTensor(codes, scales, zeros, s, (rows, cols))


def assert_export_refused(argv: list[str], exports: Path, capsys, expected: str) -> None:
    """``lowbit ARGV`` (writing under the empty folder ``exports``) exits 2 with one error line containing
    ``expected`` and writes nothing."""
    exports.mkdir()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lowbit: error: ") and expected in err
    assert not any(exports.iterdir())
