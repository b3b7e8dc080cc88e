"""Dense bit packing of b-bit codes (1..8 bits) into bytes, least significant bit first.

Signed codes are stored with an offset of 2^(b-1) so every stored value is unsigned. A b-bit stream
packs n codes into ceil(n*b/8) bytes; 3-bit codes straddle byte boundaries like any other width.
"""

from __future__ import annotations

import torch


def pack_codes(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Pack integer codes (any shape, flattened in row-major order) into a 1-D uint8 tensor."""
    u = codes.reshape(-1).to(torch.int32)
    if signed:
        u = u + (1 << (bits - 1))
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 1 << bits):
        raise ValueError(f"codes do not fit in {bits} bits")
    shifts = torch.arange(bits, dtype=torch.int32)
    bit_stream = ((u[:, None] >> shifts) & 1).reshape(-1).to(torch.uint8)
    pad = (-bit_stream.numel()) % 8
    if pad:
        bit_stream = torch.cat([bit_stream, bit_stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (bit_stream.reshape(-1, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, signed: bool, count: int) -> torch.Tensor:
    """Inverse of pack_codes: the first ``count`` codes as a 1-D int16 tensor."""
    shifts = torch.arange(8, dtype=torch.int32)
    bit_stream = ((packed.to(torch.int32)[:, None] >> shifts) & 1).reshape(-1)[: count * bits]
    weights = 1 << torch.arange(bits, dtype=torch.int32)
    u = (bit_stream.reshape(count, bits) * weights).sum(-1, dtype=torch.int32)
    if signed:
        u = u - (1 << (bits - 1))
    return u.to(torch.int16)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take when packed."""
    return (count * bits + 7) // 8
