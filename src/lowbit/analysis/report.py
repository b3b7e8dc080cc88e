"""What ``lowbit analyze`` and ``lowbit compare`` print and write beside their results (rich tables, one plot)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lowbit.analysis.sensitivity import Sensitivity
from lowbit.io_utils import atomic_file

TOP = 12


def sensitivity_section(sens: Sensitivity) -> dict[str, Any]:
    """The page's sensitivity input: measured KLD and Fisher proxy per linear at the probe."""
    linears = [m for m in sens.modules if m.kind == "linear" and m.probe in m.kld]
    return {"spec": sens.probe, "spearman": {k: v for k, v in sens.spearman.items() if k != "modules"},
            "modules": [{"name": m.name, "kld": m.kld[m.probe], "proxy": m.fisher.get(m.probe)} for m in linears]}


def write_analysis(sens: Sensitivity, out: Path) -> None:
    """``out/sensitivity.json`` and ``out/sensitivity.png`` (per-linear bars), each written atomically."""
    from lowbit.analysis.plots import sensitivity_plot

    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "sensitivity.json", force=True) as tmp:
        Path(tmp).write_text(json.dumps(sens.to_dict(), indent=1))
    plot = sensitivity_plot(sensitivity_section(sens))
    with atomic_file(out / "sensitivity.png", force=True) as tmp:
        Path(tmp).write_bytes(plot.png)


def print_analysis(sens: Sensitivity, console: Console | None = None) -> None:
    """The most sensitive linears, the per-block table, the embedding, and how far the proxies can be trusted."""
    console = console or Console()
    linears = sorted((m for m in sens.modules if m.kind == "linear" and m.probe in m.kld), key=lambda m: -m.kld[m.probe])
    table = Table(title=f"most sensitive linears at {sens.probe} (only that linear quantized)")
    for col in ("module", "at", "KLD measured", "Fisher proxy", "Hessian proxy"):
        table.add_column(col, justify="left" if col in ("module", "at") else "right")
    for m in linears[:TOP]:
        table.add_row(m.name, m.probe, f"{m.kld[m.probe]:.5f}", f"{m.fisher.get(m.probe, 0):.5f}",
                      f"{m.hessian.get(m.probe, 0):.4g}")
    console.print(table)
    if sens.blocks:
        cands = [c for c in sens.candidates if any(c in b["kld"] for b in sens.blocks)]
        blocks = Table(title="KLD with one whole block quantized")
        blocks.add_column("block")
        for c in cands:
            blocks.add_column(c, justify="right")
        for b in sens.blocks:
            blocks.add_row(str(b["index"]), *(f"{b['kld'][c]:.4f}" if c in b["kld"] else "-" for c in cands))
        console.print(blocks)
    for m in sens.modules:
        if m.kind != "linear":
            console.print(f"{m.kind} {m.name}: " + ", ".join(f"{c} {v:.4f}" for c, v in m.kld.items()))
    rho = sens.spearman
    console.print(f"Spearman rank correlation with the measured KLD over {rho.get('modules')} linears: "
                  f"Fisher proxy {_fmt(rho.get('fisher'))}, Hessian proxy {_fmt(rho.get('hessian'))} "
                  "(>= 0.8: the cheap score ranks layers as the measurement does).")
    cal = sens.calibration
    state = "read from the cache" if sens.cached else f"measured in {sens.seconds.get('total', 0):.0f} s"
    console.print(f"[dim]{cal['samples']} x {cal['length']} tokens of {cal['text']} for the statistics, KLD on "
                  f"{cal['kld_windows']} x {cal['kld_length']} of them (statistics in {cal['dtype']}, KLD in "
                  f"{cal.get('kld_dtype', cal['dtype'])}); {state}.[/dim]")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_compare(result: dict[str, Any], console: Console | None = None) -> None:
    """The compare table in the terminal (the page has the plots)."""
    console = console or Console()
    table = Table(title=f"compare: {result['model']}")
    for col in ("option", "size", "bpw", "PPL", "KLD", "predicted", "top-1", "seconds"):
        table.add_column(col, justify="left" if col == "option" else "right")
    for r in result["rows"]:
        table.add_row(r["name"], f"{r['size_bytes'] / 1e6:.1f} MB", _num(r.get("bits_per_weight"), ".3f"),
                      _num(r.get("ppl"), ".3f"), _num(r.get("kld"), ".4f"), _num(r.get("predicted_kld"), ".4f"),
                      _num(r.get("top1"), ".4f"), _num(r.get("seconds"), ".1f"))
    console.print(table)


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)
