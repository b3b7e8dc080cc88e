"""NVFP4, MXFP4 and MXFP8 against slow loop references, and against gguf's MXFP4/NVFP4 block decoders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import dequantize, get_format, parse_spec, quantize
from lowbit.formats.packing import pack_codes
from tests.formats.test_floating import E2M1, ref_e2m1_code, ref_fp8_code, ref_fp8_value

f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731


def ref_e2m1_value(code: int) -> float:
    return -E2M1[code & 7] if code & 8 else E2M1[code & 7]


def ref_nvfp4(w: torch.Tensor):
    """(codes, e4m3 scale codes, global) by the compressed-tensors rule, one block of 16 at a time."""
    global_scale = f32(448.0 * 6.0) / w.abs().max()
    codes, scale_codes = [], []
    for row in w:
        for start in range(0, row.numel(), 16):
            block = row[start : start + 16]
            raw = (block.abs().max() / 6.0) * global_scale
            scode = ref_fp8_code(min(max(raw.item(), 2.0**-9), 448.0), "fp8_e4m3")
            step = f32(ref_fp8_value(scode, "fp8_e4m3")) / global_scale
            scale_codes.append(scode)
            codes += [ref_e2m1_code(v) for v in (block / step).tolist()]
    return codes, scale_codes, global_scale


def ref_mx(w: torch.Tensor, elem_max: float):
    """(shared scales 2^(floor(log2 amax) - emax) as biased exponents, elements/scale) per block of 32."""
    emax = math.floor(math.log2(elem_max))
    exps, scaled = [], []
    for row in w:
        for start in range(0, row.numel(), 32):
            block = row[start : start + 32].tolist()
            amax = max(abs(v) for v in block)
            e = math.frexp(amax)[1] - 1 - emax + 127 if amax > 0 else 0
            exps.append(e)
            scaled += [v / 2.0 ** (e - 127) for v in block]
    return exps, scaled


def _weights(rows=8, cols=128, seed=0):
    torch.manual_seed(seed)
    return torch.randn(rows, cols) * 0.02 * torch.logspace(-2, 0, rows)[:, None]


def test_nvfp4_matches_loop_reference():
    w = _weights()
    q = quantize(w, parse_spec("nvfp4"))
    codes, scale_codes, global_scale = ref_nvfp4(w)
    assert q.global_scale.tolist() == [global_scale.item()]
    assert q.scales.dtype == torch.float8_e4m3fn and q.scales.shape == (8, 8)
    assert q.scales.view(torch.uint8).reshape(-1).tolist() == scale_codes
    assert q.codes.reshape(-1).tolist() == codes
    step = q.scales.float() / q.global_scale
    expected = torch.tensor([ref_e2m1_value(c) for c in codes]).reshape(8, 128) * step.repeat_interleave(16, 1)
    assert torch.equal(dequantize(q), expected)


def test_nvfp4_blocks_decode_with_gguf():
    from gguf.quants import NVFP4

    w = _weights(seed=1)
    q = quantize(w, parse_spec("nvfp4"))
    sub = q.codes.to(torch.uint8).reshape(-1, 4, 2, 8)  # super-blocks of 64 = 4 sub-blocks of 16
    qs = (sub[:, :, 0] | (sub[:, :, 1] << 4)).reshape(-1, 32)
    raw = torch.cat([q.scales.view(torch.uint8).reshape(-1, 4), qs], dim=1).numpy()
    decoded = torch.from_numpy(NVFP4.dequantize_blocks(raw).reshape(w.shape).copy())
    # GGUF NVFP4 has no tensor-level scale: its blocks decode to code_value * block_scale exactly.
    assert torch.equal(decoded, get_format("nvfp4").decode(q.codes) * q.scales.float().repeat_interleave(16, 1))
    torch.testing.assert_close(decoded / q.global_scale, dequantize(q), rtol=2**-23, atol=0)


@pytest.mark.parametrize("name,elem_max", [("mxfp4", 6.0), ("mxfp8", 448.0)])
def test_mx_matches_loop_reference(name, elem_max):
    w = _weights(seed=2)
    w[0, :32] = torch.tensor([4.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4)  # amax 4: scale 1, E2M1 ties
    q = quantize(w, parse_spec(name))
    exps, scaled = ref_mx(w, elem_max)
    assert q.scales.dtype == torch.float8_e8m0fnu
    assert q.scales.view(torch.uint8).reshape(-1).tolist() == exps
    if name == "mxfp4":
        assert q.codes.reshape(-1).tolist() == [ref_e2m1_code(v, ties="down") for v in scaled]
    else:
        assert q.codes.reshape(-1).tolist() == [ref_fp8_code(v, "fp8_e4m3") for v in scaled]
    step = torch.tensor([2.0 ** (e - 127) for e in exps]).reshape(8, -1).repeat_interleave(32, 1)
    assert torch.equal(dequantize(q), get_format(name).decode(q.codes) * step)


def test_mxfp4_bytes_equal_gguf():
    from gguf.quants import MXFP4

    w = _weights(rows=16, cols=256, seed=3)
    w[0, :32] = torch.tensor([4.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4)
    w[1, :32] = torch.tensor([-4.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0] * 4)
    w[2, :32] = 0.0
    q = quantize(w, parse_spec("mxfp4"))
    nib = q.codes.to(torch.uint8).reshape(-1, 2, 16)  # nibble j low = element j, high = element j + 16
    ours = torch.cat([q.scales.view(torch.uint8).reshape(-1, 1), nib[:, 0] | (nib[:, 1] << 4)], dim=1).numpy()
    ref = MXFP4.quantize_blocks(w.numpy().reshape(-1, 32))
    assert np.array_equal(ours, ref)
    assert np.array_equal(MXFP4.dequantize_blocks(ours).reshape(w.shape), dequantize(q).numpy())


def test_bits_and_packing_of_block_formats():
    w = _weights()
    for name, bits in (("nvfp4", 4), ("mxfp4", 4), ("mxfp8", 8)):
        q = quantize(w, parse_spec(name))
        assert q.spec.bits == bits and not q.spec.codes_signed
        assert pack_codes(q.codes, bits, signed=False).numel() == w.numel() * bits // 8


def test_block_format_spec_strings():
    assert str(parse_spec("nvfp4")) == "nvfp4" and str(parse_spec("mxfp4:mse")) == "mxfp4:mse"
    spec = parse_spec("nvfp4")
    assert (spec.granularity, spec.group_size, spec.scale_dtype) == ("group", 16, "e4m3")
    assert parse_spec("mxfp8").scale_dtype == "e8m0"
    assert parse_spec("fp4_e2m1:g16:scale=e4m3").scale_dtype == "e4m3"


@pytest.mark.parametrize("text,message", [
    ("nvfp4:g32", "always uses groups of 16"),
    ("mxfp4:scale=fp16", "always uses groups of 32"),
    ("nvfp4:asym", "no asymmetric"),
    ("int4:g32:asym:scale=e4m3", "symmetric specs only"),
    ("int4:g32:scale=e5m3", "unknown scale dtype"),
])
def test_bad_block_specs_are_one_line_errors(text, message):
    with pytest.raises(LowbitError, match=message) as info:
        parse_spec(text)
    assert "\n" not in str(info.value)


def test_rows_must_be_whole_blocks():
    with pytest.raises(LowbitError, match="multiple of 16 values, got 24") as info:
        quantize(torch.randn(4, 24), parse_spec("nvfp4"), name="layer.weight")
    assert "\n" not in str(info.value) and str(info.value).startswith("layer.weight")
    with pytest.raises(LowbitError, match="multiple of 32"):
        quantize(torch.randn(4, 48), parse_spec("mxfp4"))


def test_scheme_overrides_that_break_a_block_format_are_refused():
    from lowbit.schemes import get_scheme, weight_spec

    with pytest.raises(LowbitError, match="groups of 16"):
        weight_spec(get_scheme("NVFP4"), group_size=32)
    assert str(weight_spec(get_scheme("nvfp4"), scale_search="mse")) == "nvfp4:mse"


def test_nvfp4_mse_search_keeps_the_global_scale_and_is_not_worse():
    from lowbit.methods.rtn import rtn

    w = _weights(seed=4)
    plain = quantize(w, parse_spec("nvfp4"))
    searched = rtn(w, parse_spec("nvfp4:mse"))
    assert torch.equal(searched.global_scale, plain.global_scale)
    assert ((dequantize(searched) - w) ** 2).sum() <= ((dequantize(plain) - w) ** 2).sum()


def test_part_of_a_tensor_uses_the_whole_tensors_global_scale():
    from lowbit.formats.quantize import encode, global_scale_of, params_from_range

    w = _weights(seed=5)
    spec = parse_spec("nvfp4")
    whole = quantize(w, spec)
    gs = global_scale_of(w, spec)
    part = w[:, :32].reshape(8, 2, 16)
    scales, _ = params_from_range(part.amin(-1), part.amax(-1), spec, global_scale=gs)
    assert torch.equal(scales.view(torch.uint8), whole.scales[:, :2].view(torch.uint8))
    assert torch.equal(encode(w[:, :32], scales, None, spec, gs), whole.codes[:, :32])
    with pytest.raises(ValueError, match="global_scale"):
        encode(w[:, :32], scales, None, spec)
