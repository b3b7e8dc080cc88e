"""HQQ lowers the lp reconstruction error it optimizes, needs an asymmetric spec, and round-trips."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import dequantize, parse_spec
from lowbit.methods.hqq import hqq, shrink_lp
from lowbit.methods.rtn import rtn


@pytest.mark.parametrize("text", ["int4:g64:asym", "int3:g128:asym", "int2:g32:asym", "int4:g100:asym"])
def test_hqq_beats_minmax_rtn(text):
    torch.manual_seed(0)
    w = torch.randn(64, 300) * 0.05
    spec = parse_spec(text)
    err = {f.__name__: float((dequantize(f(w, spec)) - w).abs().mean()) for f in (rtn, hqq)}
    assert err["hqq"] < err["rtn"]


def test_codes_and_float_zeros_reproduce_the_dequantized_tensor():
    w = torch.randn(16, 128)
    q = hqq(w, parse_spec("int4:g32:asym"))
    assert q.zeros.dtype == torch.float16 and q.codes.min() >= 0 and q.codes.max() <= 15
    s = q.scales.float().repeat_interleave(32, 1)
    z = q.zeros.float().repeat_interleave(32, 1)
    assert torch.equal(dequantize(q), (q.codes.float() - z) * s)


def test_shrink_is_the_lp_prox():
    x = torch.tensor([-2.0, -0.05, 0.0, 0.05, 2.0])
    out = shrink_lp(x, beta=10.0, p=1.0)
    assert torch.allclose(out, torch.tensor([-1.9, 0.0, 0.0, 0.0, 1.9]))


def test_symmetric_spec_is_refused():
    with pytest.raises(LowbitError, match="asymmetric"):
        hqq(torch.randn(4, 32), parse_spec("int4:g32"))
