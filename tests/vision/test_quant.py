import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import dequantize
from lowbit.vision.quant import ActQuant, WeightQuant
from lowbit.vision.schemes import get_scheme
from lowbit.training.ste import lsq_grad_scale, lsq_quantize, sign_ste


@pytest.mark.parametrize("spec", ["int8:channel:scale=fp32", "int4:channel:mse:scale=fp32"])
def test_weight_fake_quant_equals_dequantized_qtensor(spec):
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    wq = WeightQuant(w, spec)
    assert torch.equal(wq(w), dequantize(wq.qtensor(w)))


def test_lsq_against_a_loop_and_its_gradients():
    x = torch.tensor([-3.0, -0.26, 0.0, 0.24, 0.76, 9.0], requires_grad=True)
    step = torch.tensor(0.5, requires_grad=True)
    y = lsq_quantize(x, step, -8, 7, grad_scale=0.25)
    expect = [max(-8, min(7, round(v / 0.5))) * 0.5 for v in x.tolist()]
    assert y.tolist() == expect
    y.sum().backward()
    assert x.grad.tolist() == [1, 1, 1, 1, 1, 0]  # STE inside the grid, zero where clamped
    # LSQ: d/ds = sum(round(x/s) - x/s inside, qmin/qmax outside), times the gradient scale
    inside = [round(v / 0.5) - v / 0.5 for v in [-3.0, -0.26, 0.0, 0.24, 0.76]]
    assert math.isclose(float(step.grad), 0.25 * (sum(inside) + 7), rel_tol=1e-5)
    assert lsq_grad_scale(100, 7) == 1 / math.sqrt(700)


def test_sign_ste_is_binary_with_clipped_gradient():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1, -1, 1, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 0]


def test_unsigned_activation_grid_after_relu():
    q = ActQuant(8, signed=False)
    q.start_observing()
    q(torch.linspace(0, 2.55, 256))
    q.finish_observing()
    assert (q.qmin, q.qmax, q.zero_point) == (0, 255, 0)
    assert math.isclose(float(q.step), 0.01, rel_tol=1e-3)


def test_unknown_scheme_is_a_one_line_error():
    with pytest.raises(LowbitError, match="unknown CNN scheme 'w3a3'; use one of int8, w7a8, w4a4, xnor"):
        get_scheme("w3a3")
