"""``lowbit compare``: every option on the same model and the same evaluation tokens, one row each, written as
one HTML page and Markdown (``lowbit.analysis.page``).

Rows: schemes x methods (lowbit folders), GGUF types (measured in llama.cpp), presets and budgeted mixes
(``--target-bpw``). Each finished row is saved as JSON under ``<out>/rows/`` with a key of everything it depends
on, so an interrupted compare resumes where it stopped and a changed option recomputes only its rows.

The rows are a sweep (``lowbit.analysis.sweep``): measured in this process, or as Ray tasks with ``--ray``. Several
models make one sweep of every (model, row) pair, then one page per model. Rows are the same either way except
``TIMING_FIELDS`` (wall-clock seconds, which differ between any two runs).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.analysis.sweep import RowTask, SweepOptions, run_sweep
from lowbit.errors import LowbitError
from lowbit.io_utils import atomic_file

ROW_VERSION = 1
GGUF_METHODS = ("rtn", "imatrix", "gptq")
TIMING_FIELDS = ("seconds",)  # the row fields that differ between two runs of the same row


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


def row_tasks(opts: CompareOptions) -> tuple[RowTask, ...]:
    """One sweep task per row. The tasks carry absolute paths (model folder or file, output folder), so a worker
    whose working directory differs measures the same files; the keys are made from the options as given."""
    out = opts.out.absolute()
    model = opts.base.model
    portable = replace(opts, out=out, base=replace(opts.base, model=str(Path(model).absolute()))
                       if model and Path(model).exists() else opts.base)
    label = Path(model).stem.lower() if model else "smollm2"
    return tuple(RowTask(f"{label}: {row.name}", out / "rows" / f"{row.slug}.json", _row_key(row, opts.base),
                         partial(_measure_row, row, portable)) for row in opts.rows)


def run_compare(opts: CompareOptions, progress: bool = True,
                sweep: SweepOptions = SweepOptions()) -> tuple[dict[str, Any], Path, Path]:
    """Measure every row (reusing finished ones), then write compare.json, compare.html and compare.md."""
    return run_compare_batch((opts,), progress, sweep)[0]


def run_compare_batch(batch: tuple[CompareOptions, ...], progress: bool = True,
                      sweep: SweepOptions = SweepOptions()) -> list[tuple[dict[str, Any], Path, Path]]:
    """Several compares (typically one per model) as one sweep of all their rows, then each one's page."""
    outs = [o.out.absolute() for o in batch]
    if len(set(outs)) != len(outs):
        raise LowbitError("two compares of the batch write to the same folder; give each model its own --out")
    plans = [row_tasks(o) for o in batch]
    rows = run_sweep([t for plan in plans for t in plan], sweep, progress)
    done, start = [], 0
    for opts, plan in zip(batch, plans):
        done.append(_write_compare(opts, rows[start:start + len(plan)], progress))
        start += len(plan)
    return done


def _write_compare(opts: CompareOptions, rows: list[dict[str, Any]],
                   progress: bool) -> tuple[dict[str, Any], Path, Path]:
    from lowbit.analysis.page import render_compare

    result = _result(opts, rows, progress)
    with atomic_file(opts.out / "compare.json", force=True) as tmp:
        Path(tmp).write_text(json.dumps({k: v for k, v in result.items() if k != "layers"}, indent=1))
    html, md = render_compare(result, opts.out)
    return result, html, md


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
