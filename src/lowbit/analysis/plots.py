"""The plots of the ``lowbit compare`` page (``lowbit.analysis.page``) and of ``lowbit analyze``'s report: size vs
quality with its Pareto frontier, per-module sensitivity, and one layer's weight and error histograms.

Each is drawn on matplotlib's Agg canvas directly (no pyplot: no global figure state) and returned as PNG bytes
with the file name and alt text the page needs.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MB = 1e6
DPI = 110
KIND_STYLE = {"scheme": ("#1f77b4", "o"), "gguf": ("#ff7f0e", "s"), "preset": ("#2ca02c", "^"),
              "budget": ("#d62728", "*")}
OTHER_KIND = ("#7f7f7f", "X")


@dataclass(frozen=True)
class Plot:
    """A rendered figure: ``file`` is its name under plots/ in the Markdown version."""

    file: str
    alt: str
    png: bytes


@dataclass(frozen=True)
class ErrorAxis:
    """What "error" means on the size/quality plot: KLD for causal LMs, 1 - cosine for encoders."""

    label: str
    get: Callable[[dict], float | None]


KLD_AXIS = ErrorAxis("KL divergence vs original", lambda r: r.get("kld"))
COSINE_AXIS = ErrorAxis("1 - embedding cosine vs original",
                        lambda r: None if r.get("cosine") is None else 1.0 - r["cosine"])


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def pareto_plot(rows: Sequence[dict], axis: ErrorAxis, front: Sequence[int]) -> Plot:
    """Every row as a point (size MB, error), coloured and shaped by kind, labelled by name; the frontier as a
    step line; budget rows enlarged, with the allocator's predicted KLD as a hollow marker."""
    points = [(i, rows[i]["size_bytes"] / MB, axis.get(rows[i])) for i in range(len(rows))
              if rows[i].get("size_bytes") is not None and axis.get(rows[i]) is not None]
    positive = [y for _, _, y in points if y > 0]
    floor = min(positive) / 3 if positive else 1e-6  # a log axis cannot show 0 (the unquantized row)

    fig = Figure(figsize=(9.5, 5.8), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    for kind in sorted({rows[i].get("kind") or "other" for i, _, _ in points}):
        color, marker = KIND_STYLE.get(kind, OTHER_KIND)
        mine = [(x, max(y, floor)) for i, x, y in points if (rows[i].get("kind") or "other") == kind]
        budget = kind == "budget"
        ax.scatter(*zip(*mine), c=color, marker=marker, s=160 if budget else 45, label=kind, zorder=3,
                   edgecolors="black" if budget else "none", linewidths=0.8)
    for i, x, y in points:
        predicted = rows[i].get("predicted_kld")
        if predicted is not None and axis is KLD_AXIS:
            ax.scatter([x], [max(predicted, floor)], facecolors="none", edgecolors=KIND_STYLE["budget"][0],
                       marker="*", s=160, zorder=3)
            ax.plot([x, x], [max(predicted, floor), max(y, floor)], ":", color=KIND_STYLE["budget"][0], lw=1)
        ax.annotate(rows[i]["name"], (x, max(y, floor)), textcoords="offset points", xytext=(5, 4), fontsize=7,
                    fontweight="bold" if rows[i].get("kind") == "budget" else "normal")
    fx = [rows[i]["size_bytes"] / MB for i in front]
    fy = [max(axis.get(rows[i]), floor) for i in front]
    ax.step(fx, fy, where="post", color="black", lw=1.1, alpha=0.6, label="Pareto frontier", zorder=2)
    if any(rows[i].get("predicted_kld") is not None for i, _, _ in points) and axis is KLD_AXIS:
        ax.scatter([], [], facecolors="none", edgecolors=KIND_STYLE["budget"][0], marker="*", s=160,
                   label="predicted (budget)")
    ax.set_yscale("log")
    ax.margins(x=0.12)  # room for the labels of the rightmost points
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel(axis.label + (f" (values ≤ 0 drawn at {floor:.1g})" if len(positive) < len(points) else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return Plot("pareto.png", f"Size (MB) vs {axis.label} for {len(points)} options", _png(fig))


def _short_names(names: Sequence[str]) -> list[str]:
    """Names without their common dotted prefix (``model.layers.``), for axis labels."""
    prefix = os.path.commonprefix(list(names)) if len(names) > 1 else ""
    cut = prefix.rfind(".") + 1
    return [name[cut:] or name for name in names]


def sensitivity_plot(sensitivity: dict) -> Plot:
    """Measured KLD per module as bars (model order), the proxy as markers on a second axis; the title gives
    the spec and the Spearman rank correlations of each proxy with the measured KLD."""
    modules = sensitivity["modules"]
    n = len(modules)
    x = np.arange(n)
    fig = Figure(figsize=(min(max(8.0, 0.22 * n + 2.5), 30.0), 5.2), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    kld = [m.get("kld") if m.get("kld") is not None else np.nan for m in modules]
    bars = ax.bar(x, kld, color="#1f77b4", label="measured KLD")
    ax.set_ylabel("KLD (only this module quantized)")
    handles = [bars]
    with_proxy = [(i, m["proxy"]) for i, m in enumerate(modules) if m.get("proxy") is not None]
    if with_proxy:
        ax2 = ax.twinx()
        handles += ax2.plot(*zip(*with_proxy), "D", color="#d62728", ms=4, label="proxy")
        ax2.set_ylabel("proxy")
    step = max(1, math.ceil(n / 70))
    ax.set_xticks(x[::step], _short_names([m["name"] for m in modules])[::step], rotation=90,
                  fontsize=7 if n <= 40 else 5)
    ax.set_xlim(-0.6, n - 0.4)
    rho = ", ".join(f"{k} {v:.2f}" for k, v in (sensitivity.get("spearman") or {}).items())
    ax.set_title(f"Per-module sensitivity at {sensitivity.get('spec', '?')}" + (f" — Spearman: {rho}" if rho else ""))
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    return Plot("sensitivity.png", f"Measured KLD and proxy for {n} modules at {sensitivity.get('spec', '?')}",
                _png(fig))


def layer_plot(index: int, layer: dict) -> Plot:
    """Histograms of a sample of one layer's float weights and of its quantization errors."""
    weights = np.asarray(layer["weights"], dtype=np.float64).reshape(-1)
    errors = np.asarray(layer["errors"], dtype=np.float64).reshape(-1)
    fig = Figure(figsize=(10, 3.6), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    left.hist(weights, bins=100, color="#1f77b4")
    left.set_title(f"float weights ({weights.size} sampled)", fontsize=9)
    rms = float(np.sqrt(np.mean(errors ** 2))) if errors.size else 0.0
    right.hist(errors, bins=100, color="#d62728")
    right.set_title(f"quantized − float (RMS {rms:.3g})", fontsize=9)
    fig.suptitle(f"{layer['name']} — {layer['spec']}", fontsize=10)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", layer["name"])
    return Plot(f"layer-{index:02d}-{slug}.png", f"Histograms of weights and quantization errors of {layer['name']}",
                _png(fig))
