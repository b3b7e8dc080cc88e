"""Block encoders: byte-identical to the gguf package's reference quantizers where it has them; k-quants decoded
by gguf's dequantizers; importance weights lower the weighted error; a loop reference for Q4_0 and Q4_K."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants

from lowbit.errors import LowbitError
from lowbit.gguf.blocks import get_block_type

REFERENCE_TYPES = ["BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "MXFP4"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# relative weighted squared error of the reference rounding on Gaussian rows (loose upper bounds)
KQUANT_ERROR = {"Q2_K": 0.12, "Q3_K": 0.035, "Q4_K": 0.008, "Q5_K": 0.002, "Q6_K": 0.0005}


def _rows(seed: int = 0, n: int = 48, k: int = 512) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, k)) * rng.exponential(1.0, (n, 1))).astype(np.float32)
    x[0] = 0                      # an all-zero row
    x[1, :64] = x[1, 0]           # constant blocks
    x[2, :32] = np.linspace(-1, 1, 32, dtype=np.float32)  # exact ties
    x[3, 5] = -40                 # an outlier
    return x


@pytest.mark.parametrize("name", REFERENCE_TYPES)
def test_reference_bytes_match_gguf(name):
    block = get_block_type(name)
    x = _rows()
    ours = block.quantize(x)
    ref = quants.quantize(x, block.ggml)
    assert np.array_equal(ours.view(np.uint8).reshape(ref.shape), ref)


@pytest.mark.parametrize("name", KQUANTS + ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0"])
def test_grid_values_are_what_gguf_decodes(name):
    """The affine grid we round onto is exactly what the consumer's decoder reconstructs."""
    block = get_block_type(name)
    x = _rows(1).reshape(-1, block.block_size)
    for w in (None, np.random.default_rng(2).random(x.shape).astype(np.float32) + 0.1):
        grid = block.fit(x, w)
        codes = grid.nearest(x)
        data = block.pack(grid, codes)
        assert data.shape == (x.shape[0], block.type_size)
        np.testing.assert_array_equal(block.dequantize(data).reshape(x.shape), grid.values(codes))


@pytest.mark.parametrize("name", KQUANTS)
def test_kquant_error_bounds(name):
    block = get_block_type(name)
    x = _rows(3)[4:]
    err = ((block.dequantize(block.quantize(x)) - x) ** 2).sum() / (x ** 2).sum()
    assert err < KQUANT_ERROR[name]


@pytest.mark.parametrize("name", KQUANTS + ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ2_0", "MXFP4"])
def test_importance_weights_lower_weighted_error(name):
    block = get_block_type(name)
    rng = np.random.default_rng(4)
    x = _rows(4)[4:]
    w = (rng.exponential(1.0, x.shape[1]) ** 2).astype(np.float32)

    def werr(data):
        return float((w * (block.dequantize(data) - x) ** 2).sum())

    assert werr(block.quantize(x, w)) < werr(block.quantize(x))


def test_unknown_type_and_ragged_rows_are_one_line_errors():
    with pytest.raises(LowbitError, match="unknown GGUF tensor type"):
        get_block_type("Q7_K")
    with pytest.raises(LowbitError, match="multiple of 256"):
        get_block_type("Q4_K").quantize(np.zeros((2, 96), np.float32))


def _loop_q4_0(x: np.ndarray) -> bytes:
    """ggml-quants.c quantize_row_q4_0_ref, one value at a time."""
    out = bytearray()
    for blk in x.reshape(-1, 32):
        amax = mx = np.float32(0)
        for v in blk:
            if amax < abs(v):
                amax, mx = abs(v), v
        d = np.float32(mx / np.float32(-8))
        idn = np.float32(1) / d if d else np.float32(0)
        out += np.float16(d).tobytes()
        for j in range(16):
            lo = min(15, int(np.float32(blk[j] * idn) + np.float32(8.5)))
            hi = min(15, int(np.float32(blk[j + 16] * idn) + np.float32(8.5)))
            out.append(lo | (hi << 4))
    return bytes(out)


def _loop_dequant_q4_k(block: bytes) -> list[float]:
    """ggml-quants.c dequantize_row_q4_K for one super-block, one value at a time."""
    d, dmin = np.frombuffer(block[:4], np.float16).astype(np.float32)
    sc, qs = block[4:16], block[16:]

    def scale_min(j):
        if j < 4:
            return sc[j] & 63, sc[j + 4] & 63
        return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)

    y = []
    for c in range(4):
        (s1, m1), (s2, m2) = scale_min(2 * c), scale_min(2 * c + 1)
        q = qs[32 * c:32 * c + 32]
        y += [d * s1 * (b & 0xF) - dmin * m1 for b in q]
        y += [d * s2 * (b >> 4) - dmin * m2 for b in q]
    return y


def test_q4_0_matches_loop_reference():
    x = _rows(5, n=4, k=64)
    assert get_block_type("Q4_0").quantize(x).tobytes() == _loop_q4_0(x)


def test_q4_k_layout_matches_loop_decoder():
    x = _rows(6, n=6, k=256)[1:]
    block = get_block_type("Q4_K")
    data = block.quantize(x)
    for row, raw in zip(block.dequantize(data), data):
        np.testing.assert_allclose(row, _loop_dequant_q4_k(raw.tobytes()), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K", "Q3_K"])
def test_row_slices_encode_the_same_bytes(monkeypatch, type_name):
    """Large tensors are encoded a slice of rows at a time (bounded memory); the bytes are the same."""
    from lowbit.gguf import blocks as blocks_module

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((40, 512)).astype(np.float32)
    weights = rng.random(512).astype(np.float32) + 0.1
    block = blocks_module.get_block_type(type_name)
    whole = [block.quantize(rows), block.quantize(rows, weights)]
    monkeypatch.setattr(blocks_module, "ROW_SLICE_ELEMENTS", 7 * 512)
    assert np.array_equal(block.quantize(rows), whole[0])
    assert np.array_equal(block.quantize(rows, weights), whole[1])
