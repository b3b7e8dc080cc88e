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


@pytest.mark.parametrize("spec", ["int8:channel", "int4:g32:asym", "int3:g64:asym:mse", "nf4:g64"])
def test_large_tensors_are_rounded_in_row_slices_bit_for_bit(monkeypatch, spec):
    """Row slicing (which bounds memory on 262k-row embeddings) gives the very codes and scales of one pass,
    and the sliced dequantization the very values."""
    import importlib

    quantize_module = importlib.import_module("lowbit.formats.quantize")
    rtn_module = importlib.import_module("lowbit.methods.rtn")  # the module, not the function of that name

    torch.manual_seed(0)
    w = torch.randn(100, 128)
    whole = rtn_module.rtn(w, parse_spec(spec))
    values = quantize_module.dequantize(whole)
    monkeypatch.setattr(rtn_module, "ROW_CHUNK_ELEMENTS", 7 * 128)
    monkeypatch.setattr(quantize_module, "DEQUANT_CHUNK_ELEMENTS", 9 * 128)
    sliced = rtn_module.rtn(w, parse_spec(spec))
    assert torch.equal(sliced.codes, whole.codes) and torch.equal(sliced.scales, whole.scales)
    assert (sliced.zeros is None) == (whole.zeros is None)
    assert sliced.zeros is None or torch.equal(sliced.zeros, whole.zeros)
    assert sliced.shape == whole.shape == (100, 128)
    assert torch.equal(quantize_module.dequantize(sliced), values)
