"""Human-readable tables of what quantization gained and lost (rich), from report dictionaries."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def quantize_table(report: dict[str, Any], title: str | None = None) -> Table:
    """Original vs quantized: size, bits per weight, quality and seconds."""
    ev = report.get("eval") or {}
    table = Table(title=title or f"{report['scheme']} ({report.get('spec') or report.get('float_dtype')}, {report['method']})")
    table.add_column("model")
    table.add_column("size", justify="right")
    table.add_column("bpw", justify="right")
    if "cosine" in ev:
        table.add_column("cosine (mean / min)", justify="right")
    else:
        for col in ("PPL", "KLD", "top-1"):
            table.add_column(col, justify="right")
    table.add_column("seconds", justify="right")
    secs = report.get("seconds", {})
    if "cosine" in ev:
        table.add_row("original", _mb(report.get("source_bytes")), "32 (fp32)", "1.0000", "-")
        table.add_row("quantized", _mb(report["size_bytes"]), _num(report["bits_per_weight"], ".3f"),
                      f"{ev['cosine']:.4f} / {ev['cosine_min']:.4f}", _seconds(secs))
    else:
        table.add_row("original", _mb(report.get("source_bytes")), "32 (fp32)", _num(ev.get("ppl_base"), ".3f"),
                      "0", "1.0000", "-")
        table.add_row("quantized", _mb(report["size_bytes"]), _num(report["bits_per_weight"], ".3f"),
                      _num(ev.get("ppl"), ".3f"), _num(ev.get("kld"), ".4f"), _num(ev.get("top1"), ".4f"),
                      _seconds(secs))
    return table


def _seconds(secs: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.1f}" for k, v in secs.items() if k != "load")


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Print the table and a note about what the numbers mean."""
    console = console or Console()
    console.print(quantize_table(report))
    ev = report.get("eval") or {}
    if report.get("streamed"):
        console.print("[dim]streamed block by block: not evaluated here; run 'lowbit eval DIR' to measure.[/dim]")
    if "tokens" in ev:
        console.print(f"[dim]evaluated on {ev['windows']} windows x {ev['window_length']} tokens of {ev['text']}; "
                      "KLD = mean KL(original || quantized) per token; bpw counts codes, scales and zeros "
                      "of the quantized weights; original size = source file on disk.[/dim]")
    if report.get("embeddings"):
        line = f"embeddings: {report['embeddings']}"
        if report.get("lm_head"):
            line += f"; lm_head: {report['lm_head']}"
        ref = report.get("gguf_reference")
        if ref:
            line += (f"; {ref['type']} GGUF of the same model: {ref['tensor_bytes'] / 1e6:.1f} MB of tensors "
                     f"({'not larger' if ref['not_larger'] else 'LARGER'} here)")
        console.print(f"[dim]{line}.[/dim]")
    alloc = report.get("allocation")
    if alloc:
        measured = alloc.get("measured_kld")
        console.print(f"[dim]budgeted mix ({alloc['target']}): {alloc['bits_per_weight']:.3f} bits per allocated weight, "
                      f"{', '.join(f'{c} x{n}' for c, n in alloc['modules_by_candidate'].items())}; predicted KLD "
                      f"{alloc['predicted_kld']:.4f}, measured {'-' if measured is None else format(measured, '.4f')} "
                      f"(sensitivity {'from the cache' if alloc.get('sensitivity_cached') else 'measured'}).[/dim]")
    cal = report.get("calibration")
    if cal:
        console.print(f"[dim]calibration: {cal['samples']} samples x {cal['length']} tokens of {cal['text']} "
                      f"(from token {cal['first_token']} on, disjoint from the evaluation windows); "
                      f"peak RSS {report.get('peak_rss_mb', 0):.0f} MB.[/dim]")
    load = (report.get("seconds") or {}).get("load")
    if load is not None and report.get("peak_rss_mb"):
        console.print(f"[dim]loaded in {load:.1f} s; peak RSS of the whole run {report['peak_rss_mb']:.0f} MB.[/dim]")
    if str(report.get("model", "")).endswith(".Q4_1.gguf"):
        console.print("[dim]note: this model's float weights are dequantized Q4_1 (asymmetric 4-bit, blocks of 32); "
                      "specs that re-quantize onto that grid look better here than on a true float model.[/dim]")
