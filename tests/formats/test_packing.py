"""Dense bit packing: exact round trips for every width, known byte layouts, sizes."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats.packing import pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("count", [1, 7, 8, 33, 1000])
def test_round_trip(bits, signed, count):
    g = torch.Generator().manual_seed(bits * 100 + count)
    lo = -(2 ** (bits - 1)) if signed else 0
    codes = torch.randint(lo, lo + 2**bits, (count,), generator=g, dtype=torch.int16)
    packed = pack_codes(codes, bits, signed)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(count, bits)
    assert torch.equal(unpack_codes(packed, bits, signed, count), codes)


def test_known_layout_lsb_first():
    assert pack_codes(torch.tensor([1, 2, 3]), 2, signed=False).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_codes(torch.tensor([0xA, 0x5]), 4, signed=False).tolist() == [0x5A]
    # 3-bit codes straddle bytes: 7,0,7 -> bits 111 000 111 -> 0b11000111, 0b1
    assert pack_codes(torch.tensor([7, 0, 7]), 3, signed=False).tolist() == [0b11000111, 0b1]
    # signed codes are stored with an offset of 2^(b-1)
    assert pack_codes(torch.tensor([-8, 7]), 4, signed=True).tolist() == [0xF0]


def test_out_of_range_codes_are_refused():
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([16]), 4, signed=False)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([-9]), 4, signed=True)


def test_matrix_round_trip_keeps_row_major_order():
    codes = torch.arange(-8, 8, dtype=torch.int16).repeat(6).reshape(8, 12)
    back = unpack_codes(pack_codes(codes, 4, True), 4, True, codes.numel()).reshape(8, 12)
    assert torch.equal(back, codes)


def test_packing_in_chunks_gives_the_same_bytes(monkeypatch):
    from lowbit.formats import packing

    codes = torch.randint(-8, 8, (10_001,), dtype=torch.int16)
    whole = packing.pack_codes(codes, 4, signed=True)
    monkeypatch.setattr(packing, "_PACK_CHUNK", 1024)
    assert torch.equal(packing.pack_codes(codes, 4, signed=True), whole)
    assert torch.equal(packing.unpack_codes(whole, 4, True, codes.numel()), codes)
