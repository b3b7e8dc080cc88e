"""The MSE clipping search is never worse than plain min/max, and usually better on heavy tails."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats import dequantize, parse_spec, quantize
from lowbit.formats.quantize import minmax_params
from lowbit.formats.scale_search import mse_params


def _error(w, spec, params, importance=None):
    err = (dequantize(quantize(w, spec, params=params)) - w) ** 2
    return float((err * importance).sum() if importance is not None else err.sum())


DATA = {
    "normal": lambda g: torch.randn(64, 512, generator=g),
    "student_t": lambda g: torch.distributions.StudentT(2.0).sample((64, 512)),
    "outliers": lambda g: torch.randn(64, 512, generator=g) * (1 + 20 * (torch.rand(64, 512, generator=g) > 0.999)),
}


@pytest.mark.parametrize("data", list(DATA))
@pytest.mark.parametrize("text", ["int8:channel", "int4:g128", "int4:g128:asym", "int3:g64:asym", "int2:g64", "int4:g100"])
def test_mse_never_worse_than_minmax(data, text):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    w = DATA[data](g)
    spec = parse_spec(text)
    base = _error(w, spec, minmax_params(w, spec))
    searched = _error(w, spec, mse_params(w, spec))
    assert searched <= base


def test_mse_strictly_better_on_heavy_tails():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((64, 512))
    spec = parse_spec("int3:g128:asym")
    assert _error(w, spec, mse_params(w, spec)) < 0.9 * _error(w, spec, minmax_params(w, spec))


def test_importance_weights_the_search():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((32, 256))
    importance = torch.rand(256) ** 4
    spec = parse_spec("int3:g64")
    weighted = _error(w, spec, mse_params(w, spec, importance=importance), importance)
    unweighted = _error(w, spec, mse_params(w, spec), importance)
    assert weighted <= unweighted


def test_hessian_clipping_search_lowers_output_error():
    torch.manual_seed(0)
    x = torch.randn(1024, 256) * (torch.rand(256) * 3) ** 2
    w = torch.distributions.StudentT(3.0).sample((32, 256)) * 0.05
    H = 2 * x.T @ x / 1024
    for text in ("int3:g64:asym", "int4:g100", "int4:channel"):
        spec = parse_spec(text)

        def out_err(params):
            d = dequantize(quantize(w, spec, params=params)) - w
            return float(((d @ H) * d).sum())

        assert out_err(mse_params(w, spec, hessian=H)) <= out_err(minmax_params(w, spec))
        assert out_err(mse_params(w, spec, hessian=H)) <= out_err(mse_params(w, spec)) * 1.0001
