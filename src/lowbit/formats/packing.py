"""Dense bit packing of b-bit codes (1..8 bits) into bytes, least significant bit first.

Signed codes are stored with an offset of 2^(b-1) so every stored value is unsigned. A b-bit stream
packs n codes into ceil(n*b/8) bytes; 3-bit codes straddle byte boundaries like any other width.
"""

from __future__ import annotations

import torch


_PACK_CHUNK = 1 << 14  # codes packed per step (a multiple of 8, so chunks end on byte boundaries)


def pack_codes(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Pack integer codes (any shape, flattened in row-major order) into a 1-D uint8 tensor.

    Done 16,384 codes at a time: the bit stream takes 32 bytes per 8-bit code, which for a whole
    embedding matrix (28M codes) was a 1.8 GB peak."""
    flat = codes.reshape(-1)
    if flat.numel() <= _PACK_CHUNK:
        return _pack(flat, bits, signed)
    out = torch.empty(packed_nbytes(flat.numel(), bits), dtype=torch.uint8)
    step = _PACK_CHUNK * bits // 8
    for k, i in enumerate(range(0, flat.numel(), _PACK_CHUNK)):
        piece = _pack(flat[i : i + _PACK_CHUNK], bits, signed)
        out[k * step : k * step + piece.numel()] = piece
    return out


def _pack(flat: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    u = flat.to(torch.int32)
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
