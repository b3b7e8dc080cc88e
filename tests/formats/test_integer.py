"""Integer quantization against slow loop-based references, for every granularity and bit width."""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch

from lowbit.formats import dequantize, fake_quantize, parse_spec, quantize
from lowbit.formats.quantize import SCALE_TORCH_DTYPES
from lowbit.formats.registry import get_format


def reference_quantize(w: torch.Tensor, spec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(codes, scales, zeros, dequantized) by visiting one block at a time with plain scalar formulas."""
    rows, cols = w.shape
    br, bc = spec.block_size(rows, cols)
    nr, nc = math.ceil(rows / br), math.ceil(cols / bc)
    bits = spec.bits
    sdtype = SCALE_TORCH_DTYPES[spec.scale_dtype]
    tiny = torch.finfo(sdtype).tiny
    codes = torch.zeros(rows, cols, dtype=torch.int16)
    deq = torch.zeros(rows, cols)
    scales = torch.zeros(nr, nc, dtype=sdtype)
    zeros = None if spec.symmetric else torch.zeros(nr, nc, dtype=torch.int16)
    for i, j in itertools.product(range(nr), range(nc)):
        r0, c0 = i * br, j * bc
        block = w[r0 : r0 + br, c0 : c0 + bc]
        lo, hi = block.min(), block.max()
        if spec.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
            scale = torch.clamp(amax / ((2**bits - 1) / 2), min=tiny).to(sdtype)
            s = scale.float()
            q = torch.clamp(torch.round(block / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            d = q * s
        else:
            lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
            scale = torch.clamp((hi - lo) / (2**bits - 1), min=tiny).to(sdtype)
            s = scale.float()
            z = torch.clamp(torch.round(-lo / s), 0, 2**bits - 1)
            q = torch.clamp(torch.round(block / s) + z, 0, 2**bits - 1)
            d = (q - z) * s
            zeros[i, j] = int(z)
        scales[i, j] = scale
        codes[r0 : r0 + br, c0 : c0 + bc] = q.to(torch.int16)
        deq[r0 : r0 + br, c0 : c0 + bc] = d
    return codes, scales, zeros, deq


SPECS = [
    "int8:tensor", "int8:channel", "int4:channel:asym", "int4:g32", "int4:g128:asym", "int3:g128:asym",
    "int2:g64", "int2:g64:asym", "int5:g48:scale=fp32", "int6:b16x32", "int4:b24x40:asym:scale=bf16", "int7:g100",
]


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("shape", [(48, 576), (37, 200)])
def test_fast_path_matches_loop_reference(text, shape):
    spec = parse_spec(text)
    torch.manual_seed(zlib.crc32(f"{text}{shape}".encode()))
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 0.1
    qt = quantize(w, spec)
    codes, scales, zeros, deq = reference_quantize(w, spec)
    assert torch.equal(qt.codes, codes)
    assert torch.equal(qt.scales, scales)
    assert (qt.zeros is None) == (zeros is None)
    if zeros is not None:
        assert torch.equal(qt.zeros, zeros)
    assert torch.equal(dequantize(qt), deq)


@pytest.mark.parametrize("text", SPECS)
def test_fake_quant_is_dequantize_of_quantize_bit_for_bit(text):
    spec = parse_spec(text)
    w = torch.randn(40, 160)
    assert torch.equal(fake_quantize(w, spec), dequantize(quantize(w, spec)))


def test_ragged_last_group_uses_only_its_own_values():
    # Row of 576 in groups of 128: the last group has 64 values and its own scale.
    w = torch.zeros(1, 576)
    w[0, :512] = 1.0
    w[0, 512:] = 0.01
    qt = quantize(w, parse_spec("int4:g128"))
    assert qt.scales.shape == (1, 5)
    assert qt.scales[0, 4].float() == pytest.approx(0.01 / 7.5, rel=1e-3)
    assert torch.allclose(dequantize(qt)[0, 512:], torch.full((64,), 0.01), rtol=0.1)


def test_codes_stay_in_range_and_zero_is_exact():
    w = torch.randn(64, 256) * 3
    for text in ("int2:g64", "int3:g128:asym", "int8:channel"):
        spec = parse_spec(text)
        qt = quantize(w, spec)
        lo, hi = (-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1) if spec.symmetric else (0, 2**spec.bits - 1)
        assert int(qt.codes.min()) >= lo and int(qt.codes.max()) <= hi
        w0 = w.clone()
        w0[:, 0] = 0.0
        assert torch.all(fake_quantize(w0, spec)[:, 0] == 0)


def test_error_shrinks_with_more_bits():
    w = torch.randn(128, 512)
    errors = [float((fake_quantize(w, parse_spec(f"int{b}:g128")) - w).pow(2).mean()) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_conv_weight_is_quantized_per_filter():
    w = torch.randn(8, 3, 3, 3)
    qt = quantize(w, parse_spec("int8:channel"))
    assert qt.codes.shape == (8, 27) and qt.scales.shape == (8, 1)
    assert dequantize(qt).shape == w.shape


def test_all_zero_block_quantizes_to_zero():
    w = torch.zeros(4, 64)
    assert torch.equal(fake_quantize(w, parse_spec("int4:g32")), w)
    assert torch.equal(fake_quantize(w, parse_spec("int4:g32:asym")), w)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_in_place_round_trip_equals_encode_then_decode(bits):
    """The MSE search's in-place round trip gives exactly decode(encode(x, z)) - z, with and without zero points."""
    fmt = get_format(f"int{bits}")
    x = torch.randn(40, 6, 16, generator=torch.Generator().manual_seed(bits)) * 2 ** bits
    zero = torch.randint(0, 2 ** bits, (40, 6, 1), generator=torch.Generator().manual_seed(1)).float()
    assert torch.equal(fmt.round_trip(x.clone(), None), fmt.decode(fmt.encode(x, None)))
    assert torch.equal(fmt.round_trip(x.clone(), zero), fmt.decode(fmt.encode(x, zero)) - zero)
