"""GPTQ's numpy column loop against the same steps written with tensor operations."""

from __future__ import annotations

import pytest
import torch

from lowbit.methods.gptq_kernel import round_columns


def eager_round_columns(W1, Hn1, Err1, Q1, scales, zeros, code_range, start, stop, end):
    """Column by column: round, clamp, keep the error, push it onto the later columns up to ``end``."""
    for i in range(start, stop):
        s = scales[i - start]
        x = torch.round(W1[i] / s)
        if zeros is None:
            x = x.clamp(*code_range)
            deq = x * s
        else:
            z = zeros[i - start]
            x = (x + z).clamp(*code_range)
            deq = (x - z) * s
        Q1[i] = x
        Err1[i] = W1[i] - deq
        for k in range(i + 1, end):
            W1[k] -= Hn1[i, k] * Err1[i]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_same_codes_errors_and_updates_as_the_eager_steps(dtype, asymmetric):
    g = torch.Generator().manual_seed(1)
    cols, rows = 24, 40
    W = torch.randn(cols, rows, generator=g, dtype=dtype)
    Hn = torch.randn(cols + 8, cols + 8, generator=g, dtype=dtype)[4:4 + cols, 4:4 + cols]  # a strided view
    start, stop, end = 3, 11, 16
    scales = torch.rand(stop - start, rows, generator=g, dtype=dtype) * 0.3 + 0.05
    zeros = torch.randint(0, 16, (stop - start, rows), generator=g).to(dtype) if asymmetric else None
    code_range = (0, 15) if asymmetric else (-8, 7)
    results = []
    for run in (round_columns, eager_round_columns):
        W1, Err1, Q1 = W.clone(), torch.zeros_like(W), torch.full_like(W, -99)
        run(W1, Hn, Err1, Q1, scales, zeros, code_range, start, stop, end)
        results.append((W1, Err1, Q1))
    (W_fast, E_fast, Q_fast), (W_ref, E_ref, Q_ref) = results
    assert torch.equal(Q_fast, Q_ref)
    assert Q_fast[start:stop].min() >= code_range[0] and Q_fast[start:stop].max() <= code_range[1]
    assert torch.equal(Q_fast[:start], torch.full_like(Q_fast[:start], -99))  # other columns untouched
    torch.testing.assert_close(E_fast, E_ref, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(W_fast, W_ref, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    assert torch.equal(W_fast[end:], W[end:])  # columns past the sub-block get the errors lazily, not here


def test_expanded_scales_of_a_dynamic_group_are_read_per_column():
    """A dynamic group's one scale row, expanded over the columns (stride 0), is what each column uses."""
    W = torch.linspace(-1, 1, 5 * 8).reshape(5, 8)
    Hn = torch.eye(5)
    scale = torch.full((8,), 0.25)
    Q1 = torch.zeros_like(W)
    round_columns(W.clone(), Hn, torch.zeros_like(W), Q1, scale.expand(5, -1), None, (-8, 7), 0, 5, 5)
    assert torch.equal(Q1, torch.round(W / 0.25).clamp(-8, 7))
