"""GPTQ: round one input column at a time and push each column's error onto the columns not yet rounded.

The error feedback uses the upper Cholesky factor of H^-1 (H = 2/n X^T X from calibration inputs), with
lazy batch updates (columns are processed in blocks; the rest of the matrix is updated once per block).
Group scales are computed when the first column of a group is reached, from the already-updated weights
(the original algorithm), or up front from the original weights (``static_groups``; always so for tensor,
channel and 2-D block granularity). ``act_order`` visits columns by descending diag(H); groups stay the
contiguous groups of the original column order (static), so no group index is needed to read the result.
Any registered number format works: columns are rounded with the format's own encode/decode; formats
with two-level or power-of-two scales (NVFP4, MX) and their own scale rules use static parameters.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.formats import blocks
from lowbit.formats.integer import IntegerFormat
from lowbit.formats.qtensor import QTensor
from lowbit.formats.quantize import check_finite, global_scale_of
from lowbit.formats.registry import get_format
from lowbit.formats.scale_search import search_params
from lowbit.formats.scales import scale_values
from lowbit.formats.spec import QuantSpec
from lowbit.methods.gptq_kernel import round_columns
from lowbit.methods.hessian_factor import damped_upper_inverse_cholesky

SUB_BLOCK = 16  # columns whose errors are pushed one by one inside a lazy-update block (``_column_loop``)


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ's knobs: dampening (fraction of mean diag(H)), lazy-update block, column order, group timing."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    # What the MSE search of up-front (static) scales minimizes: the weights' own squared error ("weight"), or the
    # layer's output error under H's diagonal blocks ("output": channels with large inputs count for more; the
    # CLI default, measured on held-out text in bench/gptq_defaults.py).
    clip_objective: str = "weight"


def gptq(
    w: torch.Tensor,
    spec: QuantSpec,
    hessian: torch.Tensor | None = None,
    options: GPTQOptions = GPTQOptions(),
    name: str = "tensor",
    dtype: torch.dtype = torch.float32,
    search_dtype: torch.dtype = torch.float32,
    **_: object,
) -> QTensor:
    """Quantize ``w`` (out x in) with GPTQ error feedback under the input Hessian ``hessian`` (in x in).

    ``search_dtype`` bf16 computes the output-error scale search's products in bf16 (where the calibration passes
    run in bf16, i.e. the CPU has bf16 units; ``lowbit.formats.scale_search``)."""
    if hessian is None:
        raise LowbitError(f"{name}: GPTQ needs calibration data (an input Hessian); use --method rtn without it")
    check_finite(w, name)
    W = blocks.as_matrix(w.detach()).to(dtype).clone()
    rows, cols = W.shape
    H = hessian.to(dtype).clone()
    if H.shape != (cols, cols):
        raise LowbitError(f"{name}: Hessian shape {tuple(H.shape)} does not match {cols} input columns")
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    fmt = get_format(spec.format)
    two_level = spec.scale_dtype not in ("fp16", "bf16", "fp32") or getattr(fmt, "fixed_fields", None)
    dynamic = spec.granularity == "group" and not (options.static_groups or options.act_order or two_level)
    row_wise = spec.granularity in ("channel", "group")
    clip_hessian = H.float() if options.clip_objective == "output" and row_wise else None
    static = None if dynamic else search_params(W.float(), spec, hessian=clip_hessian, product_dtype=search_dtype)
    gs = global_scale_of(W.float(), spec)
    perm = torch.argsort(H.diagonal(), descending=True) if options.act_order else torch.arange(cols)
    WT, H = W.T[perm].contiguous(), H[perm][:, perm]
    codesT = torch.zeros(cols, rows, dtype=torch.int16)
    group_params: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    scaleT = zeroT = None
    if static is not None:
        block = spec.block_size(rows, cols)
        scaleT = blocks.expand(scale_values(static[0], gs), (rows, cols), block).T[perm].to(dtype).contiguous()
        if static[1] is not None:
            zeroT = blocks.expand(static[1].float(), (rows, cols), block).T[perm].to(dtype).contiguous()
    with _one_thread():  # also the factorization: its result must not depend on the thread count (resume)
        Hinv = damped_upper_inverse_cholesky(H, options.damp, name)
        _column_loop(WT, Hinv, codesT, group_params, scaleT, zeroT, dynamic, spec, options, dtype)
    codes = codesT[torch.argsort(perm)].T.contiguous()
    if dynamic:
        scales = torch.cat([p[0] for p in group_params], dim=1)
        zeros = None if group_params[0][1] is None else torch.cat([p[1] for p in group_params], dim=1)
    else:
        scales, zeros = static
    return QTensor(codes=codes, scales=scales, zeros=zeros, spec=spec, shape=tuple(w.shape), global_scale=gs)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run GPTQ on one thread: its many tiny ops are 10-100x slower with OpenMP fan-out on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _column_loop(WT, Hinv, codesT, group_params, scaleT, zeroT, dynamic, spec, options, dtype) -> None:
    """Round columns in order, feeding each column's scaled error to the later ones (lazy block updates).

    Works on the transposed weight ``WT`` (one contiguous row per input column) and writes ``codesT`` likewise:
    every step reads, rounds and updates contiguous memory (the column-major walk over a row-major weight
    was ~1.5x slower). The lazy updates are two-level: a column's error goes at once only to the columns of
    its sub-block of ``SUB_BLOCK``; the rest of the block gets each sub-block's errors in one product, the rest
    of the matrix each block's. Same arithmetic, in products instead of rank-1 updates. Integer formats in
    fp32/fp64 round a sub-block in one call that works on the tensors' memory as numpy arrays
    (``lowbit.methods.gptq_kernel``: numpy's calls cost less than torch's), their codes stored as floats at the
    block's end."""
    fmt = get_format(spec.format)
    in_numpy = (isinstance(fmt, IntegerFormat) and dtype in (torch.float32, torch.float64)
                and WT.device.type == "cpu")  # the loop reads the tensors' memory as numpy arrays
    # a dynamic group reads the columns ahead fully updated: its first column must start a sub-block
    sub = math.gcd(SUB_BLOCK, spec.group_size) if dynamic else SUB_BLOCK
    # Hinv's rows over their diagonal: a column's error pushed on as w - deq, no division per column
    Hn = Hinv / Hinv.diagonal()[:, None]
    cols = WT.shape[0]
    for i1 in range(0, cols, options.block_size):
        i2 = min(i1 + options.block_size, cols)
        W1, Hn1 = WT[i1:i2].clone(), Hn[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        Q1 = torch.empty_like(W1) if in_numpy else None  # the block's codes as floats, stored at its end
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            if in_numpy:
                _round_integer_columns(W1, WT, Hn1, Err1, Q1, i1, i2, j1, j2, group_params, scaleT, zeroT,
                                       dynamic, spec, fmt, dtype)
            else:
                for i in range(j1, j2):
                    col = i1 + i
                    s, z = _column_params(W1, WT, i, i2, col, group_params, scaleT, zeroT, dynamic, spec, dtype)
                    q = fmt.encode(W1[i] / s, z)
                    values = fmt.decode(q).to(dtype)
                    deq = (values - z) * s if z is not None else values * s
                    codesT[col] = q
                    torch.sub(W1[i], deq, out=Err1[i])
                    W1[i:j2].addr_(Hn1[i, i:j2], Err1[i], alpha=-1)  # one fused rank-1 update, no temporary
            W1[j2:].addmm_(Hn1[j1:j2, j2:].T, Err1[j1:j2], alpha=-1)
        if in_numpy:
            codesT[i1:i2].copy_(Q1)
        WT[i2:].addmm_(Hn[i1:i2, i2:].T, Err1, alpha=-1)


def _column_params(W1, WT, i, i2, col, group_params, scaleT, zeroT, dynamic, spec, dtype):
    """Scale and zero rows of column ``col``: a dynamic group's, searched when its first column is reached on
    the columns ahead as updated so far; else the static ones."""
    if dynamic:
        if col % spec.group_size == 0:
            g = torch.cat([W1[i:], WT[i2:]])[: spec.group_size]
            group_params.append(search_params(g.T.float(), spec.with_options(granularity="channel")))
        s = group_params[-1][0].to(dtype)[:, 0]
        return s, None if group_params[-1][1] is None else group_params[-1][1].to(dtype)[:, 0]
    return scaleT[col], None if zeroT is None else zeroT[col]


def _round_integer_columns(W1, WT, Hn1, Err1, Q1, i1, i2, j1, j2, group_params, scaleT, zeroT, dynamic, spec,
                           fmt, dtype) -> None:
    """Sub-block ``j1:j2`` of the block at ``i1`` through ``round_columns``: in one call, or with dynamic groups
    one call per group part (a group's parameters are searched when its first column is reached)."""
    start = j1
    while start < j2:
        col = i1 + start
        if dynamic:
            s, z = _column_params(W1, WT, start, i2, col, group_params, scaleT, zeroT, dynamic, spec, dtype)
            stop = min(j2, start + spec.group_size - col % spec.group_size)
            scales = s.expand(stop - start, -1)
            zeros = None if z is None else z.expand(stop - start, -1)
        else:
            stop = j2
            scales = scaleT[i1 + start: i1 + stop]
            zeros = None if zeroT is None else zeroT[i1 + start: i1 + stop]
        code_range = fmt.signed_range() if zeros is None else fmt.zero_range()
        round_columns(W1, Hn1, Err1, Q1, scales, zeros, code_range, start, stop, j2)
        start = stop
