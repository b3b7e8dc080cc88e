"""Shared pieces of the GGUF block encoders: the grid every block type with error feedback rounds onto (affine
integer codes, or a scaled codebook), C-compatible rounding, and the weighted scale search the importance matrix
drives.

All numeric work is float32 numpy, like ggml's reference C code, so the reference paths can be byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

F32 = np.float32


@dataclass(frozen=True)
class Grid:
    """Where each element of a set of blocks may land: ``value = scale * level[code] + offset``, ``code`` in
    ``0..qmax``. The levels are the integers ``0..qmax`` (an affine grid) unless ``levels`` names a codebook
    (ascending float32, ``qmax + 1`` of them: the IQ4 types). ``header`` holds the type's stored fields (fp16
    scales, packed sub-scales...)."""

    scale: np.ndarray   # (n_blocks, block_size) float32
    offset: np.ndarray  # (n_blocks, block_size) float32
    qmax: int
    header: dict[str, np.ndarray]
    levels: np.ndarray | None = None

    def nearest(self, x: np.ndarray) -> np.ndarray:
        """Codes of the grid points nearest to ``x``. Where the scale is 0 every code gives one value: affine
        grids take the code of value 0 (or 0), codebooks the level nearest 0."""
        with np.errstate(divide="ignore", invalid="ignore"):
            v = (x - self.offset) / self.scale
        if self.levels is not None:
            return nearest_level(self.levels, np.where(self.scale == 0, F32(0), v))
        q = np.where(self.scale == 0, _zero_code(self), nearest_int(v))
        return np.clip(q, 0, self.qmax).astype(np.uint8)

    def values(self, codes: np.ndarray) -> np.ndarray:
        """The float values the codes decode to (what llama.cpp computes when it dequantizes)."""
        level = codes.astype(F32) if self.levels is None else self.levels[codes]
        return (self.scale * level + self.offset).astype(F32)


def _zero_code(grid: Grid) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(grid.scale != 0, 0, np.rint(-grid.offset / np.where(grid.scale == 0, 1, grid.scale)))
    return np.clip(np.nan_to_num(z), 0, grid.qmax)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: round half to even, as the 1.5*2^23 trick does; returns int32."""
    return np.rint(np.nan_to_num(v, nan=0.0, posinf=4e6, neginf=-4e6)).astype(np.int32)


def nearest_level(levels: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Index of the level (``levels`` ascending) nearest to ``v``, compared in float32 like ggml's
    ``best_index_int8``: the upper level on ties, the end level beyond either end, the top one for NaN."""
    v = np.asarray(v, dtype=F32)
    mu = np.clip(np.searchsorted(levels, v, side="right"), 1, len(levels) - 1)
    return np.where(v - levels[mu - 1] < levels[mu] - v, mu - 1, mu).astype(np.uint8)


def roundf(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: half away from zero, exact for every float32 (no ``floor(v + 0.5)`` double rounding)."""
    a = np.abs(v)
    f = np.floor(a)
    return (np.sign(v) * (f + (a - f >= F32(0.5)))).astype(F32)


def fp16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 values as little-endian fp16 bytes (round to nearest even, like F16C), shape (..., 2)."""
    return np.ascontiguousarray(v.astype(np.float16)).view(np.uint8).reshape(*v.shape, 2)


def fp16_round(v: np.ndarray) -> np.ndarray:
    """``v`` rounded through fp16 and back to float32."""
    return v.astype(np.float16).astype(F32)


def safe_inverse(d: np.ndarray) -> np.ndarray:
    """``1/d`` where ``d != 0`` and 0 elsewhere, float32 (ggml's ``id = d ? 1.0f/d : 0.0f``)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, F32(0), F32(1) / np.where(d == 0, F32(1), d)).astype(F32)


def signed_absmax(x: np.ndarray) -> np.ndarray:
    """Per row, the signed value of largest magnitude (the first one on ties), keepdims."""
    idx = np.abs(x).argmax(axis=-1)[..., None]
    return np.take_along_axis(x, idx, axis=-1)


def weighted_symmetric_scale(x: np.ndarray, w: np.ndarray, nmax: int, candidates: np.ndarray) -> np.ndarray:
    """The scale ``d`` (per row) minimising sum w*(x - d*q)^2 with q = clip(round(x/d), -nmax, nmax-1).

    Like ggml's ``make_qx_quants``: the first guess maps the signed absmax onto ``-nmax``; each candidate
    (a multiplier of that guess) fixes the rounding, and the best least-squares scale for that rounding wins.
    """
    mx = signed_absmax(x)
    best_d = np.zeros_like(mx)
    best_err = np.full(mx.shape, np.inf, dtype=F32)
    nz = mx != 0
    base = np.where(nz, F32(-nmax) / np.where(nz, mx, 1), 0).astype(F32)
    for c in candidates:
        iscale = base * F32(c)
        q = np.clip(nearest_int(iscale * x), -nmax, nmax - 1).astype(F32)
        sumlx = (w * x * q).sum(-1, keepdims=True)
        suml2 = (w * q * q).sum(-1, keepdims=True)
        d = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1), 0).astype(F32)
        err = (w * (x - d * q) ** 2).sum(-1, keepdims=True)
        better = err < best_err
        best_d = np.where(better, d, best_d)
        best_err = np.where(better, err, best_err)
    return best_d


def weighted_affine_scale_min(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                              nstep: int, mad: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per row, ``(scale, min)`` minimising sum w*(x - (scale*q + min))^2, q = clip(round((x-min)/scale), 0, nmax),
    with min <= 0: ggml's ``make_qkx2_quants`` search (least-squares refit for each trial inverse scale).
    ``mad`` judges candidates by weighted absolute instead of squared error (ggml's Q2_K reference)."""
    metric = np.abs if mad else np.square
    mn = np.minimum(x.min(-1, keepdims=True), 0).astype(F32)
    mx = x.max(-1, keepdims=True)
    rng = (mx - mn).astype(F32)
    flat = rng == 0
    rng_safe = np.where(flat, F32(1), rng)
    sum_w = w.sum(-1, keepdims=True)
    sum_x = (w * x).sum(-1, keepdims=True)
    iscale = F32(nmax) / rng_safe
    scale = (F32(1) / iscale).astype(F32)
    q = np.clip(nearest_int(iscale * (x - mn)), 0, nmax).astype(F32)
    best_err = (w * metric(scale * q + mn - x)).sum(-1, keepdims=True)
    best_scale, best_min = scale, mn
    for i in range(nstep + 1):
        iscale = F32(rmin + rdelta * i + nmax) / rng_safe
        q = np.clip(nearest_int(iscale * (x - mn)), 0, nmax).astype(F32)
        sum_l = (w * q).sum(-1, keepdims=True)
        sum_l2 = (w * q * q).sum(-1, keepdims=True)
        sum_xl = (w * q * x).sum(-1, keepdims=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det_safe = np.where(ok, det, 1)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det_safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det_safe
        pos = this_min > 0
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, 1), this_scale)
        this_min = np.where(pos, 0, this_min)
        err = (w * metric(this_scale * q + this_min - x)).sum(-1, keepdims=True)
        better = ok & (err < best_err)
        best_scale = np.where(better, this_scale, best_scale).astype(F32)
        best_min = np.where(better, this_min, best_min).astype(F32)
        best_err = np.where(better, err, best_err)
    best_scale = np.where(flat, 0, best_scale).astype(F32)
    return best_scale[..., 0], (-best_min[..., 0]).astype(F32)


def positive_scale(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantize non-negative values ``x`` (rows) to ``d * L``, L in 0..nmax, minimising sum w*(x - d*L)^2:
    ggml's ``make_qp_quants`` (trial inverse scales around nmax/max, then a least-squares ``d``). Returns (d, L)."""
    mx = x.max(-1, keepdims=True)
    live = mx > 1e-15
    mx_safe = np.where(live, mx, 1).astype(F32)
    best_err = np.full(mx.shape, np.inf, dtype=F32)
    best_is = np.zeros(mx.shape, dtype=F32)
    for i in range(-4, 5):
        iscale = (F32(0.1 * i + nmax) / mx_safe).astype(F32)
        q = np.minimum(nmax, nearest_int(iscale * x)).astype(F32)
        err = (w * (x - q / iscale) ** 2).sum(-1, keepdims=True)
        better = err < best_err
        best_err, best_is = np.where(better, err, best_err), np.where(better, iscale, best_is)
    q = np.minimum(nmax, nearest_int(best_is * x)).astype(F32)
    sumlx, suml2 = (w * x * q).sum(-1, keepdims=True), (w * q * q).sum(-1, keepdims=True)
    d = np.where(live & (suml2 > 0), sumlx / np.where(suml2 > 0, suml2, 1), 0).astype(F32)
    return d[..., 0], np.where(live, q, 0).astype(np.uint8)
