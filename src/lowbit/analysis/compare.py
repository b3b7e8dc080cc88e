"""``lowbit compare``: every option on the same model and the same evaluation tokens, one row each, written as
one HTML page and Markdown (``lowbit.analysis.page``).

Rows: schemes x methods (lowbit folders), GGUF types (measured in llama.cpp), presets and budgeted mixes
(``--target-bpw``). Each finished row is saved as JSON under ``<out>/rows/`` with a key of everything it depends
on, so an interrupted compare resumes where it stopped and a changed option recomputes only its rows.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.io_utils import atomic_file

ROW_VERSION = 1
GGUF_METHODS = ("rtn", "imatrix", "gptq")


@dataclass(frozen=True)
class RowSpec:
    """One option to measure."""

    name: str
    kind: str  # scheme | gguf | preset | budget
    scheme: str = "W4A16"
    method: str = "rtn"
    gguf_type: str | None = None
    preset: str | None = None
    target_bpw: float | None = None

    @property
    def slug(self) -> str:
        return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in self.name.lower())


@dataclass(frozen=True)
class CompareOptions:
    """What ``lowbit compare`` runs; ``base`` carries the shared quantize options (model, grouping, eval, ...)."""

    base: Any  # lowbit.workflow.QuantizeOptions
    rows: tuple[RowSpec, ...]
    out: Path
    sensitivity: bool = True
    layers: int = 3  # histograms of the most sensitive layers


def build_rows(schemes: tuple[str, ...], methods: tuple[str, ...], gguf_types: tuple[str, ...],
               presets: tuple[str, ...], budgets: tuple[float, ...], group_size: int | None) -> tuple[RowSpec, ...]:
    """The rows in display order; names say what each is."""
    g = f" g{group_size}" if group_size else ""
    rows = [RowSpec(f"{s}{g} {m}", "scheme", scheme=s, method=m) for s in schemes for m in methods]
    gguf_method = methods[0] if methods and methods[0] in GGUF_METHODS else "gptq"  # the same method where it exists
    rows += [RowSpec(f"gguf {t.upper()} {gguf_method}", "gguf", method=gguf_method, gguf_type=t.upper())
             for t in gguf_types]
    rows += [RowSpec(f"preset {p}", "preset", preset=p, method=methods[0] if methods else "rtn") for p in presets]
    rows += [RowSpec(f"mix {b:g} bpw {m}", "budget", target_bpw=b, method=m) for b in budgets for m in methods]
    if not rows:
        raise LowbitError("nothing to compare: give --schemes, --formats gguf:TYPE, --presets or --target-bpw")
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise LowbitError("two compare rows have the same name; list each option once")
    return tuple(rows)


def _row_key(row: RowSpec, base: Any) -> str:
    shared = {k: v for k, v in asdict(base).items() if k not in ("out", "force", "scheme", "method", "preset",
                                                                  "target_bpw", "target_size")}
    text = json.dumps([ROW_VERSION, asdict(row), shared], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_compare(opts: CompareOptions, progress: bool = True) -> tuple[dict[str, Any], Path, Path]:
    """Measure every row (reusing finished ones), then write compare.json, compare.html and compare.md."""
    from lowbit.analysis.page import render_compare

    rows_dir = opts.out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for row in tqdm(opts.rows, desc="compare", disable=not progress):
        key = _row_key(row, opts.base)
        path = rows_dir / f"{row.slug}.json"
        cached = _read_row(path, key)
        if cached is None:
            cached = {"key": key, "row": _measure_row(row, opts, progress)}
            with atomic_file(path, force=True) as tmp:
                Path(tmp).write_text(json.dumps(cached, indent=1))
        results.append(cached["row"])
    result = _result(opts, results, progress)
    with atomic_file(opts.out / "compare.json", force=True) as tmp:
        Path(tmp).write_text(json.dumps({k: v for k, v in result.items() if k != "layers"}, indent=1))
    html, md = render_compare(result, opts.out)
    return result, html, md


def _read_row(path: Path, key: str) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("key") == key else None


def _measure_row(row: RowSpec, opts: CompareOptions, progress: bool) -> dict[str, Any]:
    if row.kind == "gguf":
        return _gguf_row(row, opts, progress)
    from lowbit.workflow import quantize_job

    base = opts.base
    q = replace(base, scheme=row.scheme if row.kind == "scheme" else base.scheme, method=row.method,
                preset=row.preset, target_bpw=row.target_bpw, out=str(opts.out / "rows" / row.slug), force=True)
    report, _ = quantize_job(q, progress=progress)
    ev = report.get("eval") or {}
    allocation = report.get("allocation") or {}
    return {
        "name": row.name, "kind": row.kind, "format": "lowbit", "scheme": report["scheme"], "method": report["method"],
        "size_bytes": report["size_bytes"], "bits_per_weight": report["bits_per_weight"],
        "ppl": ev.get("ppl"), "ppl_base": ev.get("ppl_base"), "kld": ev.get("kld"), "top1": ev.get("top1"),
        "cosine": ev.get("cosine"), "seconds": report["seconds"].get("quantize"),
        "predicted_kld": allocation.get("predicted_kld"), "kld_stats": ev.get("kld_stats"),
        "eval": {k: ev.get(k) for k in ("text", "windows", "window_length", "tokens")},
    }


def _gguf_row(row: RowSpec, opts: CompareOptions, progress: bool) -> dict[str, Any]:
    from lowbit.data.text import eval_windows, load_text, text_label, tokenize
    from lowbit.eval.llamacpp import compare_logprobs, iter_gguf_logprobs
    from lowbit.eval.lm import lm_reference
    from lowbit.export.gguf import GGUFExportOptions, export_gguf
    from lowbit.model.load import load_model

    base = opts.base
    loaded = load_model(base.model)
    ev = base.eval
    windows = eval_windows(tokenize(loaded.tokenizer, load_text(ev.text)), ev.windows, ev.length).ids
    reference = lm_reference(loaded.model, windows, progress=progress)
    numel = sum(p.numel() for p in loaded.model.parameters())
    summary = export_gguf(GGUFExportOptions(model=base.model, type=row.gguf_type,
                                            out=str(opts.out / "rows" / f"{row.slug}.gguf"), method=row.method,
                                            calib_text=base.calibration.text, eval_tokens=ev.windows * ev.length,
                                            force=True), progress=progress, loaded=loaded)
    del loaded
    metrics = compare_logprobs(reference.logprobs, iter_gguf_logprobs(summary["path"], windows), windows)
    return {
        "name": row.name, "kind": "gguf", "format": "gguf", "scheme": row.gguf_type, "method": row.method,
        "size_bytes": summary["bytes"], "bits_per_weight": 8 * summary["bytes"] / numel,
        "ppl": metrics["ppl"], "ppl_base": metrics["ppl_base"], "kld": metrics["kld"], "top1": metrics["top1"],
        "cosine": None, "seconds": summary["seconds"]["quantize"], "predicted_kld": None,
        "kld_stats": metrics.get("kld_stats"),
        "eval": {"text": text_label(ev.text), "windows": ev.windows, "window_length": ev.length,
                 "tokens": int(windows.numel())},
    }


def _result(opts: CompareOptions, rows: list[dict[str, Any]], progress: bool) -> dict[str, Any]:
    """The page's input (see ``lowbit.analysis.page``): rows, sensitivity bars and layer histograms."""
    base = opts.base
    first_eval = next((r["eval"] for r in rows if r.get("eval")), {})
    result: dict[str, Any] = {
        "model": base.model or "smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF)",
        "eval": first_eval,
        "rows": [{k: v for k, v in r.items() if k != "eval"} for r in rows],
        "sensitivity": None, "layers": [],
        "note": ("Every row is measured against the unquantized model on the same evaluation tokens; GGUF rows in "
                 "llama.cpp, the others in lowbit's fake-quant model (bit for bit what is written). Budget rows show "
                 "the allocator's predicted KLD beside the measured one."),
    }
    if base.model is None:
        result["note"] += (" The built-in model's float weights are dequantized Q4_1 (asymmetric 4-bit, blocks of 32): "
                           "specs on that grid look better here than on a true float model.")
    if opts.sensitivity:
        result["sensitivity"], result["layers"] = _sensitivity(opts, progress)
    return result


def _sensitivity(opts: CompareOptions, progress: bool) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Per-layer bars from the (cached) analysis, and histograms of the most sensitive linears at the probe."""
    from lowbit.analysis.candidates import parse_candidate
    from lowbit.analysis.sensitivity import EVAL_TOKENS, AnalyzeOptions, analyze
    from lowbit.model.load import load_model

    base = opts.base
    loaded = load_model(base.model)
    analysis = AnalyzeOptions(model=base.model, candidates=base.candidates, group_size=base.group_size,
                              symmetric=base.symmetric, calib_text=base.calibration.text,
                              eval_tokens=EVAL_TOKENS if base.calibration.text == base.eval.text else 0)
    sens = analyze(analysis, loaded=loaded, progress=progress)
    linears = [m for m in sens.modules if m.kind == "linear" and m.probe in m.kld]
    from lowbit.analysis.report import sensitivity_section

    section = sensitivity_section(sens)
    modules = dict(loaded.model.named_modules())
    layers = []
    generator = torch.Generator().manual_seed(0)
    for m in sorted(linears, key=lambda m: -m.kld[m.probe])[: opts.layers]:
        probe = parse_candidate(m.probe, gguf=sens.gguf)
        w = modules[m.name].weight.detach().float()
        err = (probe.dequantized(w) - w).reshape(-1)
        pick = torch.randperm(err.numel(), generator=generator)[:20000]
        layers.append({"name": m.name, "spec": m.probe, "weights": w.reshape(-1)[pick].numpy().astype(np.float64),
                       "errors": err[pick].numpy().astype(np.float64)})
    return section, layers
