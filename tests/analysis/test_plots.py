"""The page's figures: each a decodable PNG of the size it was drawn at, named as the Markdown page links it."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.image import imread

from lowbit.analysis.plots import COSINE_AXIS, DPI, KLD_AXIS, layer_plot, pareto_plot, sensitivity_plot


def _pixels(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(io.BytesIO(png), format="png")


def test_pareto_plot_with_a_zero_error_row_and_a_budget_row():
    rows = [{"name": "fp16", "kind": "scheme", "size_bytes": 270e6, "kld": 0.0},
            {"name": "W4A16", "kind": "scheme", "size_bytes": 90e6, "kld": 0.05},
            {"name": "budget 3.5", "kind": "budget", "size_bytes": 80e6, "kld": 0.08, "predicted_kld": 0.07},
            {"name": "no size", "kind": "gguf", "kld": 0.1}]
    plot = pareto_plot(rows, KLD_AXIS, [2, 1, 0])
    assert plot.file == "pareto.png" and "3 options" in plot.alt  # the row without a size is not drawn
    assert _pixels(plot.png).shape[:2] == (round(5.8 * DPI), round(9.5 * DPI))


def test_pareto_plot_on_the_cosine_axis():
    rows = [{"name": "int8", "kind": "scheme", "size_bytes": 23e6, "cosine": 0.997},
            {"name": "fp32", "kind": "scheme", "size_bytes": 90e6, "cosine": 1.0}]
    plot = pareto_plot(rows, COSINE_AXIS, [0, 1])
    assert "1 - embedding cosine" in plot.alt and _pixels(plot.png).ndim == 3


def test_sensitivity_and_layer_plots():
    modules = [{"name": f"model.layers.{i}.mlp.down_proj", "kld": 0.01 * (i + 1), "proxy": 0.02 * i} for i in range(5)]
    plot = sensitivity_plot({"modules": modules, "spec": "int3:g32:asym", "spearman": {"hessian": 0.9}})
    assert plot.file == "sensitivity.png" and "5 modules" in plot.alt
    _pixels(plot.png)
    rng = np.random.default_rng(0)
    layer = {"name": "model.layers.0.self_attn.q_proj", "spec": "int4:g128",
             "weights": rng.normal(size=500).tolist(), "errors": (0.01 * rng.normal(size=500)).tolist()}
    plot = layer_plot(3, layer)
    assert plot.file == "layer-03-model.layers.0.self_attn.q_proj.png"
    assert _pixels(plot.png).shape[:2] == (round(3.6 * DPI), round(10 * DPI))
