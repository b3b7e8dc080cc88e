"""IQ3_XXS and IQ3_S (their decoding and importance weighting are tested with IQ4's in test_iquants.py): values
decode as a loop over ggml's formulas says, IQ3_XXS signs keep their parity, the grid search lowers the weighted
error below plain rounding and below llama.cpp's own quantizer, and the IQ3 mixes pick llama.cpp's per-tensor
types and fallbacks."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np
import pytest
from gguf import quants

from lowbit.errors import LowbitError
from lowbit.gguf.blocks import get_block_type
from lowbit.gguf.iquants_grid import LatticeCode
from lowbit.gguf.mixes import NEED_IMATRIX, choose_type, get_mix
from tests.gguf.test_iquants import _ggml_quantizer, _importance, _role, _rows, _weighted_error
from tests.gguf.test_iquants import gqa4_llama  # noqa: F401  (the 8-layer n_gqa-4 Llama fixture)

F32 = np.float32
IQ3 = ["IQ3_XXS", "IQ3_S"]
LATTICE = IQ3 + ["IQ2_XXS"]
IQ3_MIXES = ["IQ3_XS", "IQ3_S", "IQ3_M"]
LOW_MIXES = ["IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"]  # llama.cpp wants an imatrix


def test_grids_are_gguf_py_s():
    for name, shape in (("IQ3_XXS", (256, 4)), ("IQ3_S", (512, 4)), ("IQ2_XXS", (256, 8))):
        cls = getattr(quants, name)
        cls.init_grid()
        np.testing.assert_array_equal(get_block_type(name).GRID, cls.grid.reshape(shape))


def _loop_decode(name: str, code: LatticeCode) -> np.ndarray:
    """One value at a time from the code, with the formulas of ggml's dequantize_row_iq3_*."""
    grid = get_block_type(name).GRID
    width = grid.shape[1]
    out = np.zeros((code.index.shape[0], 256), F32)
    for b in range(out.shape[0]):
        d = F32(np.float16(code.d[b]))
        for i in range(256):
            ls = F32(code.ls[b, i // 32])
            if name == "IQ3_S":
                db = F32(d * F32(1 + 2 * ls))
            else:
                db = F32(F32(d * F32(F32(0.5) + ls)) * F32(0.5 if name == "IQ3_XXS" else 0.25))
            v = F32(db * grid[code.index[b, i // width], i % width])
            out[b, i] = -v if code.negative[b, i] else v
    return out


@pytest.mark.parametrize("name", LATTICE)
def test_decoded_matches_loop_reference(name):
    block = get_block_type(name)
    code = block.encode(_rows(3, n=5, k=256))
    np.testing.assert_array_equal(block.decoded(code), _loop_decode(name, code))


@pytest.mark.parametrize("name", ["IQ3_XXS", "IQ2_XXS"])
def test_sign_groups_have_even_parity(name):
    """7 sign bits are stored per 8 values: every group's mask must be one of gguf-py's ksigns, and a flip
    only happens in groups with an odd number of negatives, on the value with the smallest x^2."""
    x = _rows(4, n=8, k=256)
    code = get_block_type(name).encode(x)
    masks = code.negative.reshape(-1, 8)
    assert (masks.sum(-1) % 2 == 0).all()
    ksigns = np.frombuffer(quants.IQ2_XXS.ksigns, np.uint8)
    packed = np.packbits(masks, axis=-1, bitorder="little")[:, 0]
    np.testing.assert_array_equal(ksigns[packed & 0x7F], packed)
    flipped = masks != (x < 0).reshape(-1, 8)
    odd = (x < 0).reshape(-1, 8).sum(-1) % 2 == 1
    np.testing.assert_array_equal(flipped.sum(-1), odd.astype(int))
    rows = np.flatnonzero(odd)
    np.testing.assert_array_equal(flipped[rows].argmax(-1), np.abs(x.reshape(-1, 8)[rows]).argmin(-1))


def _gaussian(seed: int, n: int = 64, k: int = 512) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, k)) * rng.exponential(1.0, (n, 1))).astype(F32)
    x[rng.random(x.shape) < 0.01] *= 6
    return x


@pytest.mark.parametrize("name", LATTICE)
def test_error_below_llama_cpp_s_quantizer(name):
    """On Gaussian rows with outliers, both the plain and the x^2-weighted squared error are below those of
    llama.cpp's quantizer without an imatrix (measured over three seeds: plain 0.71-0.77x IQ3_XXS, 0.70-0.74x
    IQ3_S; x^2-weighted 0.38-0.47x), and with an importance matrix the importance-weighted error too (0.70-0.80x).
    llama.cpp's IQ2_XXS quantizer aborts without an importance matrix: only that part for IQ2_XXS (0.78-0.82x)."""
    reference = _ggml_quantizer(name)
    block = get_block_type(name)
    x, ones = _gaussian(21), np.ones((64, 512), F32)
    if name != "IQ2_XXS":
        ours, theirs = block.dequantize(block.quantize(x)), block.dequantize(reference(x, None))
        assert _weighted_error(x, ours, ones) < 0.85 * _weighted_error(x, theirs, ones)
        assert _weighted_error(x, ours, x * x) < 0.6 * _weighted_error(x, theirs, x * x)
    w = _importance(22, x.shape[1])
    ours, theirs = block.dequantize(block.quantize(x, w)), block.dequantize(reference(x, w))
    assert _weighted_error(x, ours, w * ones) < 0.9 * _weighted_error(x, theirs, w * ones)


@pytest.mark.parametrize("name,x2_ratio,own_ratio", [("IQ3_XXS", 0.75, 0.9), ("IQ3_S", 0.75, 0.9),
                                                     ("IQ2_XXS", 0.88, 0.97)])
def test_search_beats_nearest_point_at_max_scale(name, x2_ratio, own_ratio):
    """The trial scales and least-squares refits lower the weighted error below the naive encoding: each
    sub-block's largest magnitude onto the grid's largest coordinate, every group on its nearest grid point, the
    signs of x and the scales kept exact (so the naive side is not charged for IQ3_XXS's sign parity nor for
    rounding scales). Measured: x^2-weighted 0.60x (IQ3_XXS) and 0.33x (IQ3_S); under the encoder's own weights
    x^2 + sigma^2/4, 0.79x and 0.47x; IQ2_XXS 0.79x and 0.92x. (The plain squared error is not lower: those
    weights favour large values.)"""
    block = get_block_type(name)
    x = _gaussian(23)
    width = block.GRID.shape[1]
    xb = x.reshape(-1, width)
    scale = np.repeat(np.abs(x).reshape(-1, 32).max(-1) / block.GRID.max(), 32 // width)
    dist = ((np.abs(xb)[:, None, :] - scale[:, None, None] * block.GRID[None]) ** 2).sum(-1)
    naive = (scale[:, None] * block.GRID[dist.argmin(-1)] * np.sign(xb)).reshape(x.shape)
    searched = block.dequantize(block.quantize(x))
    weights = x * x + 2 * (x * x).mean(-1, keepdims=True) / 4
    assert _weighted_error(x, searched, x * x) < x2_ratio * _weighted_error(x, naive, x * x)
    assert _weighted_error(x, searched, weights) < own_ratio * _weighted_error(x, naive, weights)


def test_errors_lie_between_q2_k_and_q4_k():
    """Plain squared error on Gaussian rows with outliers: Q4_K (4.5 bpw) < IQ3_S (3.44) < IQ3_XXS (3.06) < Q2_K
    (2.63); measured 0.0078, 0.030, 0.055, 0.104. IQ3_S is within 1.2x of Q3_K at the same 3.44 bpw (measured
    0.87x); IQ2_XXS (2.06) lies above Q2_K and far below TQ2_0 at the same 2.06 bpw (measured 0.19, 0.71)."""
    x = _gaussian(24)
    err = {}
    for name in ("Q4_K", "Q3_K", "IQ3_S", "IQ3_XXS", "Q2_K", "IQ2_XXS", "TQ2_0"):
        block = get_block_type(name)
        err[name] = _weighted_error(x, block.dequantize(block.quantize(x)), np.ones_like(x))
    assert 1.5 * err["Q4_K"] < err["IQ3_S"] < err["IQ3_XXS"] < 0.75 * err["Q2_K"]
    assert err["IQ3_S"] < 1.2 * err["Q3_K"]
    assert err["Q2_K"] < err["IQ2_XXS"] < 0.4 * err["TQ2_0"]


@pytest.mark.parametrize("name", LATTICE)
def test_zero_rows_and_zero_importance(name):
    """All-zero rows decode to zeros; columns the imatrix never saw keep their values (x^2 weights there; measured
    relative error 0.11 IQ3_XXS, 0.07 IQ3_S, 0.23 IQ2_XXS, against 1 for values quantized to zero)."""
    block = get_block_type(name)
    assert not block.dequantize(block.quantize(np.zeros((2, 256), F32))).any()
    x = _rows(9)[5:]
    w = _importance(10, x.shape[1])
    w[:32] = 0
    back = block.dequantize(block.quantize(x, w))
    assert np.isfinite(back).all()
    assert ((back[:, :32] - x[:, :32]) ** 2).sum() < (0.35 if name == "IQ2_XXS" else 0.2) * (x[:, :32] ** 2).sum()


def test_ragged_rows_are_one_line_errors():
    for name in LATTICE:
        with pytest.raises(LowbitError, match=f"{name} needs rows of a multiple of 256 values, got 96"):
            get_block_type(name.lower()).quantize(np.zeros((2, 96), F32))


@pytest.mark.parametrize("mix_name", IQ3_MIXES)
def test_iq3_mix_rules(mix_name):
    """llama_tensor_get_type for the IQ3 mixes of a dense model without an imatrix: default IQ3_S; attn_v Q4_K when
    n_gqa >= 4 (IQ3_M: always); IQ3_M also Q4_K for attn_output and the first eighth of ffn_down; IQ3_XS puts
    attn_q, attn_k and the middle three quarters of ffn_gate/ffn_up on IQ3_XXS; output Q6_K."""
    mix = get_mix(mix_name)
    assert mix.default == "IQ3_S"
    assert mix.file_type == {"IQ3_XS": 22, "IQ3_S": 26, "IQ3_M": 27}[mix_name]
    m, xs = mix_name == "IQ3_M", mix_name == "IQ3_XS"
    assert choose_type(mix, _role("blk.3.attn_v.weight", 512, 3, n_gqa=4)).type == "Q4_K"
    assert choose_type(mix, _role("blk.3.attn_v.weight", 512, 3, n_gqa=2)).type == ("Q4_K" if m else "IQ3_S")
    assert choose_type(mix, _role("blk.1.ffn_down.weight", 512, 1)).type == ("Q4_K" if m else "IQ3_S")
    assert choose_type(mix, _role("blk.2.ffn_down.weight", 512, 2)).type == "IQ3_S"
    assert choose_type(mix, _role("blk.2.attn_output.weight", 512, 2)).type == ("Q4_K" if m else "IQ3_S")
    for name in ("attn_q", "attn_k"):
        assert choose_type(mix, _role(f"blk.0.{name}.weight", 512, 0)).type == ("IQ3_XXS" if xs else "IQ3_S")
    for name in ("ffn_up", "ffn_gate"):
        assert choose_type(mix, _role(f"blk.1.{name}.weight", 512, 1)).type == "IQ3_S"     # first eighth
        assert choose_type(mix, _role(f"blk.2.{name}.weight", 512, 2)).type == ("IQ3_XXS" if xs else "IQ3_S")
        assert choose_type(mix, _role(f"blk.13.{name}.weight", 512, 13)).type == ("IQ3_XXS" if xs else "IQ3_S")
        assert choose_type(mix, _role(f"blk.14.{name}.weight", 512, 14)).type == "IQ3_S"   # last eighth
    assert choose_type(mix, _role("output.weight", 512)).type == "Q6_K"
    assert choose_type(mix, _role("token_embd.weight", 512)).type == "IQ3_S"
    assert choose_type(mix, _role("token_embd.weight", 512, tied=True)).type == "Q6_K"


def test_iq2_xxs_mix_rules():
    """llama_tensor_get_type for IQ2_XXS, dense, no imatrix: output Q5_K, token_embd Q2_K, attn_v Q4_K when
    n_gqa >= 4 else Q2_K, ffn_down Q2_K in the first eighth of the layers, everything else IQ2_XXS."""
    mix = get_mix("IQ2_XXS")
    assert mix.file_type == 19
    assert choose_type(mix, _role("output.weight", 512)).type == "Q5_K"
    assert choose_type(mix, _role("token_embd.weight", 512, tied=True)).type == "Q5_K"
    assert choose_type(mix, _role("token_embd.weight", 512)).type == "Q2_K"
    assert choose_type(mix, _role("blk.3.attn_v.weight", 512, 3, n_gqa=4)).type == "Q4_K"
    assert choose_type(mix, _role("blk.3.attn_v.weight", 512, 3, n_gqa=2)).type == "Q2_K"
    assert choose_type(mix, _role("blk.1.ffn_down.weight", 512, 1)).type == "Q2_K"
    for name in ("ffn_down", "ffn_up", "attn_output", "attn_q", "attn_k"):
        assert choose_type(mix, _role(f"blk.2.{name}.weight", 512, 2)).type == "IQ2_XXS"
    up = choose_type(mix, _role("blk.2.ffn_up.weight", 96, 2))
    assert (up.wanted, up.type) == ("IQ2_XXS", "IQ4_NL")


def test_iq3_fallbacks():
    """IQ3_S and IQ3_XXS rows that are not a multiple of 256 fall back to IQ4_NL, then F16; output to Q8_0."""
    xs = get_mix("IQ3_XS")
    up = choose_type(xs, _role("blk.2.ffn_up.weight", 96, 2))
    assert (up.wanted, up.type, up.fell_back) == ("IQ3_XXS", "IQ4_NL", True)
    down = choose_type(xs, _role("blk.2.ffn_down.weight", 96, 2))
    assert (down.wanted, down.type) == ("IQ3_S", "IQ4_NL")
    assert choose_type(xs, _role("blk.2.ffn_down.weight", 48, 2)).type == "F16"
    assert choose_type(xs, _role("output.weight", 96)).type == "Q8_0"
    m = choose_type(get_mix("IQ3_M"), _role("blk.0.ffn_down.weight", 96, 0))
    assert (m.wanted, m.type) == ("Q4_K", "Q5_0")


_LOGGED: list[str] = []


def _llama_quantize_types(llama_cpp, f32: Path, out: Path, file_type: int, dry_run: bool) -> dict[str, str]:
    """Run llama.cpp's llama_model_quantize and read each tensor's type from its log (a dry run writes no file
    but logs the types it would write)."""
    from llama_cpp import _logger

    @llama_cpp.llama_log_callback
    def keep(level, text, user_data):
        _LOGGED.append(text.decode("utf-8", "replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.dry_run = file_type, 1, dry_run
    _LOGGED.clear()
    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    lines = "".join(_LOGGED).splitlines()
    found = (re.match(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+-.*type =\s+(\w+)(?:.*\((\w+)\))?", line) for line in lines)
    return {m[1]: (m[3] or m[2]).upper() for m in found if m}


@pytest.mark.parametrize("mix_name", IQ3_MIXES + LOW_MIXES)
def test_mix_is_what_llama_quantize_writes(tmp_path, gqa4_llama, mix_name):
    """llama.cpp's own llama-quantize (through llama-cpp-python) on lowbit's F32 file gives every tensor the type
    lowbit's mix gives it, fallbacks included. llama-cpp-python cannot pass an importance matrix, and llama.cpp
    refuses IQ3_XXS, IQ2_* and IQ1_* tensors without one, so the types are read from a dry run's log (its choices
    without an imatrix) and compared with lowbit's plan for the same case. Mixes without such tensors are also
    written by both sides, with equal types and sizes; lowbit's ``--method rtn`` refuses the types llama.cpp
    calls garbage without an imatrix."""
    import gguf

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from lowbit.export.gguf import GGUFExportOptions, export_gguf
    from lowbit.gguf.plan import planned_tensors
    from lowbit.model.load import load_model

    f32, ours, theirs = tmp_path / "f32.gguf", tmp_path / "lowbit.gguf", tmp_path / "llama.gguf"
    export_gguf(GGUFExportOptions(model=str(gqa4_llama), type="F32", out=str(f32), method="rtn"), progress=False)
    planned = {p.name: p.choice for p in planned_tensors(load_model(str(gqa4_llama)), get_mix(mix_name))}
    mine = {name: choice.type for name, choice in planned.items()}
    file_type = int(gguf.LlamaFileType[f"MOSTLY_{mix_name}"])
    assert _llama_quantize_types(llama_cpp, f32, theirs, file_type, dry_run=True) == mine
    assert mine["blk.0.attn_v.weight"] == "Q4_K" and planned["blk.1.ffn_down.weight"].fell_back
    assert ("IQ3_XXS" in mine.values()) == (mix_name in ("IQ3_XS", "IQ3_XXS"))
    rtn = GGUFExportOptions(model=str(gqa4_llama), type=mix_name, out=str(ours), method="rtn")
    if set(mine.values()) & set(NEED_IMATRIX):
        with pytest.raises(LowbitError, match="need an importance matrix"):
            export_gguf(rtn, progress=False)
        assert not ours.exists()
        return
    summary = export_gguf(rtn, progress=False)
    assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(ours)).tensors} == mine
    assert summary["fallbacks"]["blk.1.ffn_down.weight"] == f"{planned['blk.1.ffn_down.weight'].wanted}->IQ4_NL"
    if "IQ3_XXS" not in mine.values():
        _llama_quantize_types(llama_cpp, f32, theirs, file_type, dry_run=False)
        assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(theirs)).tensors} == mine
        assert ours.stat().st_size == pytest.approx(theirs.stat().st_size, rel=0.01)
