"""NF4 and log2 (power-of-two) table formats against slow loop references."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats import dequantize, get_format, parse_spec, quantize
from lowbit.formats.lut import NF4_LEVELS, round_to_levels

F32 = lambda v: torch.tensor(v, dtype=torch.float32).item()  # noqa: E731


def ref_nearest(x: float, levels: list[float], ties: str) -> int:
    """Index of the nearest level; on an exact float32 midpoint: the lower, upper or even index."""
    for i in range(len(levels) - 1):
        mid = F32((levels[i] + levels[i + 1]) / 2)
        if x < mid:
            return i
        if x == mid:
            return {"down": i, "up": i + 1, "even": i + (i % 2)}[ties]
    return len(levels) - 1


def log2_magnitudes(bits: int) -> list[float]:
    n = 2 ** (bits - 1)
    return [0.0] + [2.0 ** -k for k in range(n - 2, -1, -1)]


@pytest.mark.parametrize("ties", ["down", "up", "even"])
def test_round_to_levels_matches_loop(ties):
    levels = [F32(v) for v in NF4_LEVELS]
    torch.manual_seed(0)
    mids = [F32((a + b) / 2) for a, b in zip(levels, levels[1:])]
    x = torch.cat([torch.rand(400) * 2.4 - 1.2, torch.tensor(mids + levels)])
    got = round_to_levels(x, torch.tensor(levels), ties)
    assert got.tolist() == [ref_nearest(v, levels, ties) for v in x.tolist()]


def test_nf4_table_is_bitsandbytes():
    fmt = get_format("nf4")
    values = fmt.decode(torch.arange(16, dtype=torch.int16))
    assert values[7].item() == 0.0 and values[0].item() == -1.0 and values[15].item() == 1.0
    assert bool((values[1:] > values[:-1]).all())
    assert values[8].item() == pytest.approx(0.07958029955625534)


def test_nf4_g64_matches_loop():
    spec = parse_spec("nf4:g64")
    torch.manual_seed(1)
    w = torch.randn(3, 160) * 0.02  # 160 = 64 + 64 + 32: ragged last group
    q = quantize(w, spec)
    levels = [F32(v) for v in NF4_LEVELS]
    for r in range(3):
        for g in range(3):
            block = w[r, 64 * g : 64 * (g + 1)]
            assert q.scales[r, g].item() == torch.tensor(block.abs().max().item()).half().item()
            x = (block / q.scales[r, g].float()).tolist()
            assert q.codes[r, 64 * g : 64 * (g + 1)].tolist() == [ref_nearest(v, levels, "down") for v in x]
    step = q.scales.float().repeat_interleave(64, 1)[:, :160]
    assert torch.equal(dequantize(q), torch.tensor(levels)[q.codes.long()] * step)


def test_nf4_double_quant_matches_loop():
    """NF4-DQ: each block's absmax is stored as E4M3 under one fp32 tensor scale (448 / amax of the tensor)."""
    from lowbit.schemes import get_scheme

    spec = parse_spec(get_scheme("NF4-DQ").weights)
    torch.manual_seed(2)
    w = torch.randn(4, 128) * torch.logspace(-3, 0, 4)[:, None]  # rows of very different magnitude
    q = quantize(w, spec)
    gs = 448.0 / w.abs().max().item()
    assert q.global_scale.item() == pytest.approx(gs, rel=1e-6)
    assert q.scales.dtype == torch.float8_e4m3fn
    levels = [F32(v) for v in NF4_LEVELS]
    for r in range(4):
        for g in range(2):
            block = w[r, 64 * g : 64 * (g + 1)]
            stored = torch.tensor(block.abs().max().item() * q.global_scale.item()).to(torch.float8_e4m3fn)
            assert q.scales[r, g].view(torch.uint8) == stored.view(torch.uint8)
            step = stored.float() / q.global_scale  # float32 division, as dequantize does
            x = (block / step).tolist()
            assert q.codes[r, 64 * g : 64 * (g + 1)].tolist() == [ref_nearest(v, levels, "down") for v in x]
    # 4 bits per code + one byte per 64 codes (+ 32 bits per tensor) against 16 bits per 64 for fp16 absmax
    stored_bits = q.codes.numel() * 4 + q.scales.numel() * 8 + 32
    assert stored_bits / q.codes.numel() == pytest.approx(4.125 + 32 / 512)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_log2_grid_and_codes_match_loop(bits):
    fmt = get_format(f"log2_{bits}")
    mags = log2_magnitudes(bits)
    n = len(mags)
    assert fmt.decode(torch.arange(n, dtype=torch.int16)).tolist() == mags
    torch.manual_seed(bits)
    x = torch.cat([torch.randn(300) * torch.rand(300) ** 4, torch.tensor([1.5, 0.75, -0.375, 2.0, -3.0, 0.0])])
    expected = []
    for v in x.tolist():
        idx = ref_nearest(abs(v), mags, "down")
        expected.append(idx | (n if v < 0 and idx > 0 else 0))
    assert fmt.encode(x, None).tolist() == expected


def test_log2_spec_quantizes_to_powers_of_two_of_the_scale():
    q = quantize(torch.randn(4, 64), parse_spec("log2_4:g32"))
    ratio = (dequantize(q) / q.scales.float().repeat_interleave(32, 1)).abs()
    nonzero = ratio[ratio > 0]
    assert torch.equal(torch.log2(nonzero), torch.round(torch.log2(nonzero)))
    assert float(nonzero.min()) >= 2.0**-6 and float(nonzero.max()) == 1.0


def test_table_formats_refuse_asymmetric():
    from lowbit.errors import LowbitError

    for text in ("nf4:g64:asym", "log2_4:asym"):
        with pytest.raises(LowbitError, match="no asymmetric"):
            parse_spec(text)
