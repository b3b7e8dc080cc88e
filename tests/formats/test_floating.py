"""FP8 E4M3/E5M2 and FP4 E2M1 against slow loop references (and torch's float8 casts)."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.formats import dequantize, get_format, parse_spec, quantize
from lowbit.formats.packing import pack_codes, unpack_codes

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
FP8 = {"fp8_e4m3": (4, 3, 7, torch.float8_e4m3fn), "fp8_e5m2": (5, 2, 15, torch.float8_e5m2)}


def ref_fp8_value(code: int, name: str) -> float | None:
    """Value of an 8-bit pattern from the bit fields; None for NaN/Inf patterns."""
    e_bits, m_bits, bias, _ = FP8[name]
    sign = -1.0 if code & 0x80 else 1.0
    exp = (code >> m_bits) & ((1 << e_bits) - 1)
    man = code & ((1 << m_bits) - 1)
    if name == "fp8_e4m3" and exp == 15 and man == 7:
        return None
    if name == "fp8_e5m2" and exp == 31:
        return None
    if exp == 0:
        return sign * man * 2.0 ** (1 - bias - m_bits)
    return sign * (1 + man / 2**m_bits) * 2.0 ** (exp - bias)


def ref_fp8_code(x: float, name: str) -> int:
    """Nearest finite pattern of x's sign, ties to the even pattern, saturating at the largest value."""
    best = None
    for code in range(256):
        v = ref_fp8_value(code, name)
        if v is None or (code >= 0x80) != (x < 0):
            continue
        key = (abs(v - x), code % 2)
        if best is None or key < best[0]:
            best = (key, code)
    return best[1]


def ref_e2m1_code(x: float, ties: str = "even") -> int:
    """Sign bit 3 + index of the nearest E2M1 magnitude; ties to the even index (or the lower one)."""
    mag = abs(x)
    dists = [abs(mag - v) for v in E2M1]
    best = min(dists)
    candidates = [i for i, d in enumerate(dists) if d == best]
    idx = candidates[0] if ties == "down" or len(candidates) == 1 else [i for i in candidates if i % 2 == 0][0]
    return idx | (8 if x < 0 and idx > 0 else 0)


def _probe_values(max_value: float) -> torch.Tensor:
    torch.manual_seed(0)
    scales = 2.0 ** torch.randint(-12, int(math.log2(max_value)) + 2, (600,)).float()
    return torch.cat([torch.randn(600) * scales, torch.tensor([0.0, max_value, -max_value, 2 * max_value, -1e9])])


@pytest.mark.parametrize("name", list(FP8))
def test_fp8_decode_matches_bit_fields(name):
    fmt = get_format(name)
    codes = torch.arange(256, dtype=torch.int16)
    values = fmt.decode(codes)
    for code in range(256):
        ref = ref_fp8_value(code, name)
        if ref is not None:
            assert values[code].item() == ref, code


@pytest.mark.parametrize("name", list(FP8))
def test_fp8_encode_matches_loop_and_torch(name):
    fmt = get_format(name)
    dtype = FP8[name][3]
    x = _probe_values(fmt.max_code_magnitude(True))
    # exact midpoints between neighbours exercise ties to even
    grid = fmt.decode(torch.arange(0, 0x7B if name == "fp8_e5m2" else 0x7E, dtype=torch.int16))
    x = torch.cat([x, (grid[:-1] + grid[1:]) / 2, -(grid[:-1] + grid[1:]) / 2])
    codes = fmt.encode(x, None)
    assert codes.tolist() == [ref_fp8_code(v, name) for v in x.tolist()]
    m = fmt.max_code_magnitude(True)
    torch_codes = x.clamp(-m, m).to(dtype).view(torch.uint8).to(torch.int16)
    assert torch.equal(codes, torch_codes)


def test_fp8_channel_spec_scales_and_codes():
    spec = parse_spec("fp8_e4m3:channel")
    assert spec.scale_dtype == "fp32" and str(spec) == "fp8_e4m3:channel"
    torch.manual_seed(1)
    w = torch.randn(6, 40) * torch.logspace(-3, 1, 6)[:, None]
    q = quantize(w, spec)
    for r in range(6):
        scale = w[r].abs().max().item() / 448.0
        assert q.scales[r, 0].item() == torch.tensor(scale, dtype=torch.float32).item()
        assert q.codes[r].tolist() == [ref_fp8_code(v, "fp8_e4m3") for v in (w[r] / q.scales[r, 0]).tolist()]
    assert torch.equal(dequantize(q), get_format("fp8_e4m3").decode(q.codes) * q.scales)


@pytest.mark.parametrize("ties", ["even", "down"])
def test_e2m1_encode_matches_loop(ties):
    from lowbit.formats.floating import Fp4Format

    fmt = Fp4Format(ties=ties)
    torch.manual_seed(2)
    mids = [(a + b) / 2 for a, b in zip(E2M1, E2M1[1:])]
    x = torch.cat([torch.randn(500) * 3, torch.tensor(mids + [-m for m in mids] + [7.0, -9.0, 0.0, -0.1])])
    assert fmt.encode(x, None).tolist() == [ref_e2m1_code(v, ties) for v in x.tolist()]


def test_e2m1_ties_to_even_index():
    fmt = get_format("fp4_e2m1")
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.25])
    assert fmt.decode(fmt.encode(x, None)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, 0.0]


def test_e2m1_decode_table_and_nibble_layout():
    fmt = get_format("fp4_e2m1")
    assert fmt.decode(torch.arange(16, dtype=torch.int16)).tolist() == E2M1 + [-0.0] + [-v for v in E2M1[1:]]


def test_fp4_group_spec_matches_loop_and_packs_at_4_bits():
    spec = parse_spec("fp4_e2m1:g32")
    torch.manual_seed(3)
    w = torch.randn(4, 80)  # ragged last group of 16
    q = quantize(w, spec)
    assert q.scales.dtype == torch.float16 and q.scales.shape == (4, 3)
    for r in range(4):
        for g in range(3):
            block = w[r, 32 * g : 32 * (g + 1)]
            assert q.scales[r, g].item() == torch.tensor(block.abs().max().item() / 6).half().item()
            s = q.scales[r, g].float()
            assert q.codes[r, 32 * g : 32 * (g + 1)].tolist() == [ref_e2m1_code(v) for v in (block / s).tolist()]
    packed = pack_codes(q.codes, spec.bits, signed=spec.codes_signed)
    assert packed.numel() == w.numel() // 2
    assert torch.equal(unpack_codes(packed, 4, spec.codes_signed, w.numel()).reshape(w.shape), q.codes)


@pytest.mark.parametrize("text", ["fp8_e4m3:asym", "fp4_e2m1:g32:asym", "fp8_e5m2:channel:mse:asym"])
def test_float_formats_refuse_asymmetric(text):
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="no asymmetric"):
        parse_spec(text)


def test_fp8_scale_dtype_round_trips_through_the_spec_string():
    for text in ("fp8_e5m2:channel", "fp8_e4m3:tensor:scale=fp16", "fp8_e4m3:g64:mse"):
        spec = parse_spec(text)
        assert parse_spec(str(spec)) == spec
