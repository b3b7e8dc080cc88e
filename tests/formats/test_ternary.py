"""Ternary (TWN scale) and binary (mean |w| scale) formats against slow loop references."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import dequantize, parse_spec, quantize
from lowbit.formats.packing import pack_codes, unpack_codes


def ref_twn(block: list[float]) -> float:
    """TWN scale of one group: mean |w| over |w| > 0.7 * mean |w| (float64)."""
    a = [abs(v) for v in block]
    delta = 0.7 * sum(a) / len(a)
    kept = [v for v in a if v > delta]
    return sum(kept) / len(kept)


def ref_ternary_code(x: float) -> int:
    return 0 if abs(x) <= 0.5 else (1 if x > 0 else -1)


def _groups(w: torch.Tensor, g: int):
    for r in range(w.shape[0]):
        for j, start in enumerate(range(0, w.shape[1], g)):
            yield r, j, start, w[r, start : start + g]


def test_ternary_matches_loop_reference_with_a_ragged_group():
    torch.manual_seed(0)
    w = torch.randn(5, 96) * 0.03  # groups of 64: the second one has 32 real elements
    q = quantize(w, parse_spec("ternary:g64"))
    assert q.scales.shape == (5, 2) and set(q.codes.unique().tolist()) <= {-1, 0, 1}
    for r, j, start, block in _groups(w, 64):
        assert q.scales[r, j].item() == torch.tensor(ref_twn(block.tolist())).half().item()
        x = (block / q.scales[r, j].float()).tolist()
        assert q.codes[r, start : start + 64].tolist() == [ref_ternary_code(v) for v in x]
    assert torch.equal(dequantize(q), q.codes.float() * q.scales.float().repeat_interleave(64, 1)[:, :96])


def test_binary_matches_loop_reference_with_a_ragged_group():
    torch.manual_seed(1)
    w = torch.randn(5, 96) * 0.03
    w[0, 3] = 0.0
    q = quantize(w, parse_spec("binary:g64"))
    for r, j, start, block in _groups(w, 64):
        mean_abs = sum(abs(v) for v in block.tolist()) / block.numel()
        assert q.scales[r, j].item() == torch.tensor(mean_abs).half().item()
        assert q.codes[r, start : start + 64].tolist() == [1 if v >= 0 else 0 for v in block.tolist()]
    assert torch.equal(dequantize(q).abs(), q.scales.float().repeat_interleave(64, 1)[:, :96])
    assert dequantize(q)[0, 3].item() > 0


def test_ternary_and_binary_pack_at_2_and_1_bits():
    torch.manual_seed(2)
    w = torch.randn(4, 64)
    for text, bits in (("ternary:g64", 2), ("binary:channel", 1)):
        q = quantize(w, parse_spec(text))
        packed = pack_codes(q.codes, bits, signed=q.spec.codes_signed)
        assert packed.numel() == w.numel() * bits // 8
        assert torch.equal(unpack_codes(packed, bits, q.spec.codes_signed, w.numel()).reshape(w.shape), q.codes)


def test_all_zero_group_stays_finite():
    w = torch.zeros(2, 64)
    ternary = quantize(w, parse_spec("ternary:g32"))
    assert torch.equal(dequantize(ternary), w)
    # binary has no zero: an all-zero group becomes +-(smallest normal fp16 scale)
    binary = quantize(w, parse_spec("binary:g32"))
    assert dequantize(binary).abs().max().item() == torch.finfo(torch.float16).tiny


@pytest.mark.parametrize("text,message", [
    ("ternary:g64:mse", "chooses its own scales"),
    ("binary:g64:asym", "no asymmetric"),
    ("ternary:g64:scale=e8m0", "needs fp16, bf16 or fp32 scales"),
])
def test_bad_specs(text, message):
    with pytest.raises(LowbitError, match=message):
        parse_spec(text)
