"""RTN is quantize() with the spec's scale search."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import dequantize, parse_spec, quantize
from lowbit.methods import get_method
from lowbit.methods.rtn import rtn


def test_rtn_minmax_is_plain_quantize():
    w = torch.randn(32, 200)
    spec = parse_spec("int4:g64:asym")
    a, b = rtn(w, spec), quantize(w, spec)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)


def test_rtn_mse_lowers_error_on_heavy_tails():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((32, 256))
    err = {s: float((dequantize(rtn(w, parse_spec(f"int3:g128:{s}"))) - w).pow(2).sum()) for s in ("minmax", "mse")}
    assert err["mse"] < err["minmax"]


def test_registry():
    assert get_method("rtn") is rtn
    with pytest.raises(LowbitError, match="unknown method"):
        get_method("nope")
