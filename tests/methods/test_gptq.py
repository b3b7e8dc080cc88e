"""GPTQ against a slow, obviously-correct reference, and against RTN on correlated inputs."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import dequantize, parse_spec
from lowbit.formats.quantize import params_from_range
from lowbit.methods.gptq import GPTQOptions, gptq
from lowbit.methods.rtn import rtn


def reference_gptq(w: torch.Tensor, H: torch.Tensor, spec, damp: float = 0.01) -> torch.Tensor:
    """Textbook GPTQ without lazy batching: after each column, update every later column at once.

    Group parameters are taken from the current (already updated) weights when a group starts.
    Returns the integer codes.
    """
    W = w.clone().double()
    H = H.clone().double()
    n = W.shape[1]
    H += torch.eye(n, dtype=H.dtype) * damp * H.diagonal().mean()
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros_like(W, dtype=torch.int16)
    bits = spec.bits
    for j in range(n):
        if spec.granularity == "channel" and j == 0 or spec.granularity == "group" and j % spec.group_size == 0:
            width = n if spec.granularity == "channel" else spec.group_size
            g = W[:, j : j + width].float()
            scale, zero = params_from_range(g.amin(1), g.amax(1), spec)
            s, z = scale.double(), None if zero is None else zero.double()
        col = W[:, j] / s
        if z is None:
            q = torch.clamp(torch.round(col), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            deq = q * s
        else:
            q = torch.clamp(torch.round(col) + z, 0, 2**bits - 1)
            deq = (q - z) * s
        codes[:, j] = q.to(torch.int16)
        err = (W[:, j] - deq) / U[j, j]
        W[:, j + 1 :] -= err[:, None] * U[j, j + 1 :][None, :]
    return codes


def _correlated(rows=24, cols=64, samples=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(samples, cols, generator=g) @ mix
    w = torch.randn(rows, cols, generator=g) * 0.1
    return w, x, 2 * x.T @ x / samples


@pytest.mark.parametrize("text", ["int4:g16:asym", "int3:g32", "int4:channel:asym", "int2:g16:asym", "int8:channel"])
def test_codes_identical_to_reference(text):
    w, _, H = _correlated()
    spec = parse_spec(text)
    fast = gptq(w, spec, H, GPTQOptions(block_size=16), dtype=torch.float64)
    assert torch.equal(fast.codes, reference_gptq(w, H, spec))


@pytest.mark.parametrize("text", ["int4:g16:asym", "int3:g32", "int4:channel:asym", "int4:g8"])
def test_two_level_lazy_updates_give_the_reference_codes(text):
    """Blocks of 64 columns hold four sub-blocks of 16 (the last block ragged): errors pushed column by column
    inside a sub-block, by products beyond it; a group of 8 makes the sub-blocks 8 wide (groups start one)."""
    w, _, H = _correlated(cols=120, seed=3)
    spec = parse_spec(text)
    fast = gptq(w, spec, H, GPTQOptions(block_size=64), dtype=torch.float64)
    assert torch.equal(fast.codes, reference_gptq(w, H, spec))


def test_output_error_not_worse_than_rtn_on_correlated_inputs():
    for seed in range(3):
        w, x, H = _correlated(rows=64, cols=128, seed=seed)
        for text in ("int4:g32:asym", "int3:g64", "int2:g32:asym"):
            spec = parse_spec(text)
            err = {name: float((x @ (dequantize(q) - w).T).pow(2).sum())
                   for name, q in (("rtn", rtn(w, spec)), ("gptq", gptq(w, spec, H)))}
            assert err["gptq"] <= err["rtn"], (seed, text, err)


def test_act_order_uses_static_groups_and_keeps_original_column_layout():
    w, x, H = _correlated(rows=32, cols=96)
    spec = parse_spec("int4:g32:asym")
    q = gptq(w, spec, H, GPTQOptions(act_order=True))
    assert q.scales.shape == (32, 3)
    # static groups: scales are exactly those of plain min/max on the original weights
    assert torch.equal(q.scales, rtn(w, spec).scales)
    out_err = float((x @ (dequantize(q) - w).T).pow(2).sum())
    assert out_err <= float((x @ (dequantize(rtn(w, spec)) - w).T).pow(2).sum())


def test_ragged_groups_and_dead_columns():
    w, _, H = _correlated(rows=16, cols=80)
    H[5, :] = 0
    H[:, 5] = 0
    q = gptq(w, parse_spec("int4:g32"), H)
    assert q.scales.shape == (16, 3)
    assert torch.all(dequantize(q)[:, 5] == 0)


def test_needs_a_hessian():
    with pytest.raises(LowbitError, match="needs calibration data"):
        gptq(torch.randn(4, 8), parse_spec("int4:channel"))


@pytest.mark.parametrize("text", ["nvfp4", "mxfp4", "fp4_e2m1:g16", "nf4:g64", "fp8_e4m3:channel"])
def test_float_formats_round_onto_their_grid_and_beat_rtn(text):
    from lowbit.formats.quantize import quantize

    w, x, H = _correlated(rows=32, cols=128)
    spec = parse_spec(text)
    q = gptq(w, spec, H)
    # the result is a valid QTensor of that format: re-encoding its own dequantized values changes nothing
    again = quantize(dequantize(q), spec, params=(q.scales, q.zeros))
    assert torch.equal(again.codes, q.codes) or torch.equal(dequantize(again), dequantize(q))
    err = {name: float((x @ (dequantize(t) - w).T).pow(2).sum()) for name, t in (("rtn", rtn(w, spec)), ("gptq", q))}
    assert err["gptq"] <= err["rtn"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_output_clip_objective_uses_the_hessian_and_wins_with_outlier_channels(seed):
    """With clip_objective="output" the static scales are the Hessian-weighted MSE search's; on inputs with a few
    large channels (as LLM activations have) the layer's output error falls well below the weight-MSE scales'."""
    from lowbit.formats.scale_search import search_params

    g = torch.Generator().manual_seed(seed)
    cols, rows, n = 128, 32, 1024
    x = torch.randn(n, cols, generator=g) * torch.where(torch.rand(cols, generator=g) < 0.05, 20.0, 1.0)
    w = torch.randn(rows, cols, generator=g) * 0.1
    H = 2 * x.T @ x / n
    spec = parse_spec("int3:g32").with_options(scale_search="mse")
    error = {}
    for clip in ("weight", "output"):
        qt = gptq(w, spec, H, GPTQOptions(act_order=True, clip_objective=clip))
        error[clip] = float(((x @ (dequantize(qt) - w).T) ** 2).mean())
        if clip == "output":
            assert torch.equal(qt.scales, search_params(w, spec, hessian=H)[0])
    assert error["output"] < 0.6 * error["weight"], error
