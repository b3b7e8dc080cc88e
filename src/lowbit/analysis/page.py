"""The ``lowbit compare`` page: one self-contained HTML file, and the same tables as Markdown.

``render_compare`` turns the compare result (one row per option tried on the same model and tokens) into
out_dir/compare.html — inline CSS, every plot a base64-embedded PNG, no script and no external reference, so
it can be mailed or archived as one file — and out_dir/compare.md, whose plots are PNG files in
out_dir/plots/. Both are built from one list of blocks (tables and plots), so they always say the same
thing in the same order (the plots: ``lowbit.analysis.plots``). Every text is HTML-escaped. A row whose metrics are NaN/Inf is refused: a non-finite result is an
error, never a row.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.analysis.frontier import pareto_front
from lowbit.analysis.plots import COSINE_AXIS, KLD_AXIS, MB, ErrorAxis, Plot, layer_plot, pareto_plot, sensitivity_plot
from lowbit.errors import LowbitError
from lowbit.io_utils import atomic_directory, atomic_file

ROW_NUMBERS = ("size_bytes", "bits_per_weight", "ppl", "ppl_base", "kld", "top1", "cosine", "seconds",
               "predicted_kld")
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } p.meta { margin: 0.2em 0; color: #444; } p.note { font-style: italic; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
tr.frontier td { background: #fff7d6; } tr.frontier td:first-child { font-weight: bold; }
figure { margin: 1em 0; } img.plot { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
"""


@dataclass(frozen=True)
class Table:
    """A table as plain strings (already formatted, not yet escaped)."""

    id: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    row_classes: tuple[str, ...]


@dataclass(frozen=True)
class Block:
    """One section of the page: a heading, a table or a plot, and a caption."""

    heading: str
    content: Table | Plot
    caption: str = ""


@dataclass(frozen=True)
class Column:
    """A table column: how to get a row's value (None shows "-") and how to format it. An optional column is
    shown only when some row has a value for it."""

    title: str
    get: Callable[[dict], Any]
    fmt: Callable[[Any], str] = str
    optional: bool = False


def _scaled(key: str, factor: float) -> Callable[[dict], Any]:
    return lambda r: None if r.get(key) is None else r[key] * factor


def _num(spec: str) -> Callable[[Any], str]:
    return lambda v: format(v, spec)


def _pm(mean: str, err: str | None, scale: float = 1.0, spec: str = ".6f") -> Callable[[dict], str]:
    """``mean ± err`` of a kld_stats dict (the error left out when the dict lacks it)."""
    def get(s: dict) -> str:
        text = format(s[mean] * scale, spec)
        return text if err is None or s.get(err) is None else f"{text} ± {format(s[err] * scale, spec)}"
    return get


RESULT_COLUMNS = (
    Column("Name", lambda r: r["name"]),
    Column("Kind", lambda r: r.get("kind")),
    Column("Format", lambda r: r.get("format")),
    Column("Size (MB)", _scaled("size_bytes", 1 / MB), _num(".1f")),
    Column("bpw", lambda r: r.get("bits_per_weight"), _num(".2f")),
    Column("PPL", lambda r: r.get("ppl"), _num(".3f"), optional=True),
    Column("KLD", lambda r: r.get("kld"), _num(".4g"), optional=True),
    Column("Top-1 (%)", _scaled("top1", 100.0), _num(".2f"), optional=True),
    Column("Cosine", lambda r: r.get("cosine"), _num(".5f"), optional=True),
    Column("Seconds", lambda r: r.get("seconds"), _num(".1f")),
    Column("Predicted KLD", lambda r: r.get("predicted_kld"), _num(".4g"), optional=True),
    Column("Pareto", lambda r: "★" if r["_frontier"] else ""),
)
KLD_STATS_COLUMNS = (
    Column("Name", lambda r: r["name"]),
    Column("Mean KLD", lambda r: _pm("kld_mean", "kld_stderr")(r["kld_stats"])),
    Column("Median", lambda r: r["kld_stats"]["kld_median"], _num(".6f")),
    Column("90%", lambda r: r["kld_stats"]["kld_p90"], _num(".6f")),
    Column("99%", lambda r: r["kld_stats"]["kld_p99"], _num(".6f")),
    Column("99.9%", lambda r: r["kld_stats"]["kld_p999"], _num(".6f")),
    Column("Max", lambda r: r["kld_stats"]["kld_max"], _num(".6f")),
    Column("Same top-1 (%)", lambda r: _pm("same_top1", "same_top1_stderr", 100, ".3f")(r["kld_stats"])),
    Column("RMS Δp (%)", lambda r: _pm("rms_dp", "rms_dp_stderr", 100, ".3f")(r["kld_stats"])),
    Column("ln(PPL ratio)", lambda r: _pm("ln_ppl_ratio", "ln_ppl_ratio_stderr")(r["kld_stats"])),
)


def render_compare(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write out_dir/compare.html and out_dir/compare.md (plots in out_dir/plots/), each atomically;
    return (html path, markdown path). Raises ``LowbitError`` naming a row whose metrics are not finite."""
    check_result(result)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = page_blocks(result)
    with atomic_directory(out_dir / "plots", force=True) as tmp:
        for block in blocks:
            if isinstance(block.content, Plot):
                (tmp / block.content.file).write_bytes(block.content.png)
    html_path, md_path = out_dir / "compare.html", out_dir / "compare.md"
    _write_text(md_path, markdown_page(result, blocks))
    _write_text(html_path, html_page(result, blocks))
    return html_path, md_path


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path, force=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and math.isfinite(float(value))


def check_result(result: dict) -> None:
    """Refuse (``LowbitError``) any row, sensitivity module or layer sample with a NaN/Inf or non-numeric metric."""
    for i, row in enumerate(result["rows"]):
        values = {k: row.get(k) for k in ROW_NUMBERS}
        values |= {f"kld_stats.{k}": v for k, v in (row.get("kld_stats") or {}).items()}
        bad = [f"{k}={v}" for k, v in values.items() if v is not None and not _finite(v)]
        if bad:
            raise LowbitError(f"compare row {row.get('name', i)!r} has non-finite metrics ({', '.join(bad)}); "
                              "a result that is not finite cannot be shown")
    sensitivity = result.get("sensitivity") or {}
    for module in sensitivity.get("modules", ()):
        if not all(module.get(k) is None or _finite(module.get(k)) for k in ("kld", "proxy")):
            raise LowbitError(f"sensitivity of {module.get('name')} is not finite "
                              f"(kld={module.get('kld')}, proxy={module.get('proxy')})")
    for layer in result.get("layers") or ():
        if not all(np.isfinite(np.asarray(layer[k], dtype=np.float64)).all() for k in ("weights", "errors")):
            raise LowbitError(f"the weight or error sample of layer {layer.get('name')} has NaN/Inf values")


def error_axis(rows: Sequence[dict]) -> ErrorAxis:
    """KLD when any row has one (causal LMs), else 1 - cosine (encoders)."""
    return KLD_AXIS if any(r.get("kld") is not None for r in rows) else COSINE_AXIS


def frontier_rows(rows: Sequence[dict], axis: ErrorAxis) -> list[int]:
    """Indices of the rows on the (size, error) Pareto frontier, by size; rows lacking either are left out."""
    plotted = [i for i, r in enumerate(rows) if r.get("size_bytes") is not None and axis.get(r) is not None]
    return [plotted[j] for j in pareto_front([(rows[i]["size_bytes"], axis.get(rows[i])) for i in plotted])]


def build_table(table_id: str, columns: Sequence[Column], rows: Sequence[dict],
                row_class: Callable[[dict], str] = lambda r: "") -> Table:
    """Format ``rows`` through ``columns`` (optional columns without any value are dropped)."""
    shown = [c for c in columns if not c.optional or any(c.get(r) is not None for r in rows)]
    cells = tuple(tuple("-" if c.get(r) is None else c.fmt(c.get(r)) for c in shown) for r in rows)
    return Table(table_id, tuple(c.title for c in shown), cells, tuple(row_class(r) for r in rows))


def page_blocks(result: dict) -> list[Block]:
    """The page after its header, in order: results table, size/quality plot, sensitivity, layer histograms,
    KL-divergence distribution table."""
    rows = result["rows"]
    axis = error_axis(rows)
    front = frontier_rows(rows, axis)
    marked = [row | {"_frontier": i in front} for i, row in enumerate(rows)]
    blocks = [Block("Results", build_table("results", RESULT_COLUMNS, marked,
                                           lambda r: "frontier" if r["_frontier"] else ""),
                    "★ marks the size/quality Pareto frontier: no other option is both smaller and closer to "
                    "the original.")]
    if front:
        blocks.append(Block("Size vs quality", pareto_plot(rows, axis, front),
                            f"Size on disk vs {axis.label} (log scale); the step line joins the frontier."))
    if result.get("sensitivity"):
        blocks.append(Block("Per-module sensitivity", sensitivity_plot(result["sensitivity"]),
                            "Bars: KL divergence when only that module is quantized; markers: the cheap proxy."))
    for i, layer in enumerate(result.get("layers") or ()):
        blocks.append(Block(f"Weights and errors: {layer['name']}", layer_plot(i, layer), f"spec {layer['spec']}"))
    with_stats = [r for r in rows if r.get("kld_stats")]
    if with_stats:
        blocks.append(Block("KL-divergence distribution", build_table("kld-stats", KLD_STATS_COLUMNS, with_stats),
                            "Per-token statistics as llama-perplexity --kl-divergence prints them "
                            "(± standard error)."))
    return blocks


# ---- text ----------------------------------------------------------------------------------------------------

def header_lines(result: dict) -> tuple[str, list[str], str]:
    """(title, meta lines, note), unescaped."""
    ev = dict(result.get("eval") or {})
    text = ev.pop("text", None)
    parts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in ev.items())
    lines = [f"Model: {result.get('model', '?')}",
             f"Evaluated on {text or '?'}" + (f" ({parts})" if parts else "")]
    base = next((r["ppl_base"] for r in result["rows"] if r.get("ppl_base") is not None), None)
    if base is not None:
        lines.append(f"Original model PPL {base:.3f}")
    return "lowbit compare", lines, result.get("note") or ""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def html_table(t: Table) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in t.headers)
    body = "".join((f'<tr class="{_esc(cls)}">' if cls else "<tr>") + "".join(f"<td>{_esc(c)}</td>" for c in row)
                   + "</tr>\n" for row, cls in zip(t.rows, t.row_classes))
    return f'<table id="{_esc(t.id)}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>'


def html_page(result: dict, blocks: Sequence[Block]) -> str:
    """The whole page as one HTML document: inline CSS, plots as data: URIs, no script."""
    title, lines, note = header_lines(result)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{_esc(title)}: {_esc(result.get('model', ''))}</title>", f"<style>{CSS}</style></head><body>",
           f"<h1>{_esc(title)}</h1>"]
    out += [f'<p class="meta">{_esc(line)}</p>' for line in lines]
    if note:
        out.append(f'<p class="note">{_esc(note)}</p>')
    for block in blocks:
        out.append(f"<h2>{_esc(block.heading)}</h2>")
        if isinstance(block.content, Table):
            out.append(html_table(block.content))
            out.append(f'<p class="caption">{_esc(block.caption)}</p>' if block.caption else "")
        else:
            data = base64.b64encode(block.content.png).decode("ascii")
            out.append(f'<figure><img class="plot" alt="{_esc(block.content.alt)}" '
                       f'src="data:image/png;base64,{data}"><figcaption>{_esc(block.caption)}</figcaption></figure>')
    out.append("</body></html>\n")
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return _esc(text).replace("|", "\\|")


def markdown_table(t: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in t.headers) + " |",
             "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(t.headers))) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def markdown_page(result: dict, blocks: Sequence[Block]) -> str:
    """The same page in Markdown; plots link to plots/<file>."""
    title, lines, note = header_lines(result)
    out = [f"# {_md_cell(title)}", ""] + [f"{_md_cell(line)}  " for line in lines]
    if note:
        out += ["", f"*{_md_cell(note)}*"]
    for block in blocks:
        out += ["", f"## {_md_cell(block.heading)}", ""]
        if isinstance(block.content, Table):
            out.append(markdown_table(block.content))
        else:
            out.append(f"![{_md_cell(block.content.alt)}](plots/{block.content.file})")
        if block.caption:
            out += ["", _md_cell(block.caption)]
    return "\n".join(out) + "\n"
