"""Dense bit streams in 32-bit words: how compressed-tensors and GPTQ store sub-byte integer codes.

Both formats keep, for every row of a 2-D tensor of unsigned b-bit codes, one little-endian bit stream:
code ``i`` occupies stream bits ``i*b .. i*b+b-1`` (least significant bit first), and stream bit ``k`` is bit
``k % 32`` of word ``k // 32``. A code may straddle two words (3, 5, 6, 7 bits); GPTQ's hand-unrolled 3-bit
layout (10 codes, a split code, 10 codes, ...) is exactly this stream. compressed-tensors packs along the
input dimension of ``weight`` ([out, in] -> [out, ceil(in*b/32)]) and along the output dimension of zero
points; GPTQ packs ``qweight`` along the input dimension of the transposed weight and ``qzeros`` along the
output dimension. Words are returned as int32 (two's complement of the unsigned word).
"""

from __future__ import annotations

import torch

from lowbit.formats.packing import pack_codes

WORD_BITS = 32


def packed_words(count: int, bits: int) -> int:
    """Number of 32-bit words that ``count`` codes of ``bits`` bits take in one row."""
    return -(-count * bits // WORD_BITS)


def pack_rows_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack each row of unsigned codes (rows, n) into its own bit stream of int32 words (rows, ceil(n*b/32)).

    The row is padded with zero codes to a multiple of 32 codes (a whole number of words), then the
    stream is cut to the words that hold real codes, as compressed-tensors does.
    """
    if codes.dim() != 2:
        raise ValueError(f"pack_rows_int32 needs a 2-D tensor, got shape {tuple(codes.shape)}")
    rows, n = codes.shape
    pad = (-n) % WORD_BITS
    padded = torch.nn.functional.pad(codes.to(torch.int32), (0, pad)) if pad else codes.to(torch.int32)
    stream = pack_codes(padded, bits, signed=False)  # rows are whole words long, so rows stay separate
    words = _bytes_to_int32(stream.reshape(rows, -1))
    return words[:, : packed_words(n, bits)].contiguous()


def pack_cols_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack each column of unsigned codes (n, cols) along dim 0: result (ceil(n*b/32), cols)."""
    return pack_rows_int32(codes.t(), bits).t().contiguous()


def _bytes_to_int32(b: torch.Tensor) -> torch.Tensor:
    """Little-endian bytes (rows, 4*k) to int32 words (rows, k), independent of the host's byte order."""
    quads = b.to(torch.int64).reshape(b.shape[0], -1, 4)
    word = quads[..., 0] | (quads[..., 1] << 8) | (quads[..., 2] << 16) | (quads[..., 3] << 24)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
