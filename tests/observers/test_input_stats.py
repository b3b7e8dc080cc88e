"""Input statistics accumulate exactly what a single pass over all rows would give."""

from __future__ import annotations

import torch

import pytest

from lowbit.observers.input_stats import GRAM_CHUNK, InputStats, add_gram, mirror_upper, rescale_inputs


def test_batches_accumulate_like_one_pass():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 16) * torch.linspace(0.1, 3, 16)
    stats = InputStats(16)
    for batch in x:
        stats.update(batch)
    flat = x.reshape(-1, 16)
    assert stats.count == 150
    assert torch.allclose(stats.hessian(), 2 * flat.T @ flat / 150, rtol=1e-5, atol=1e-5)
    assert torch.allclose(stats.mean_abs(), flat.abs().mean(0), rtol=1e-5)
    assert torch.equal(stats.abs_max, flat.abs().amax(0))
    assert torch.allclose(stats.importance(), (flat**2).mean(0), rtol=1e-5)


def test_rescale_matches_stats_of_scaled_inputs():
    torch.manual_seed(1)
    x = torch.randn(200, 8)
    s = torch.rand(8) + 0.5
    a, b = InputStats(8), InputStats(8)
    a.update(x)
    b.update(x / s)
    rescale_inputs(a, s)
    assert torch.allclose(a.hessian(), b.hessian(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(a.mean_abs(), b.mean_abs(), rtol=1e-5)
    assert torch.allclose(a.abs_max, b.abs_max, rtol=1e-6)


@pytest.mark.parametrize("features", [5, GRAM_CHUNK, GRAM_CHUNK + 1, 2 * GRAM_CHUNK + 77])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_from_the_upper_blocks_is_the_full_product(features, dtype):
    torch.manual_seed(features)
    x = (torch.randn(300, features) * torch.linspace(0.1, 4, features)).to(dtype)
    acc = torch.ones(features, features)
    add_gram(acc, x)
    whole = mirror_upper(acc)
    full = 1 + (x.T @ x).float()
    assert torch.equal(whole, whole.T)
    assert torch.allclose(whole, full, rtol=1e-5, atol=1e-4)
    assert torch.equal(acc.triu(), whole.triu())


def test_bf16_products_from_bf16_inputs_match_cast_inputs():
    torch.manual_seed(2)
    x = torch.randn(64, 40)
    a, b = InputStats(40, product_dtype=torch.bfloat16), InputStats(40, product_dtype=torch.bfloat16)
    a.update(x.bfloat16())
    b.update(x.bfloat16().float())
    assert torch.equal(a.xtx, b.xtx) and torch.equal(a.abs_sum, b.abs_sum)


def test_without_abs_statistics_the_hessian_is_the_same_and_overflow_still_shows():
    """GPTQ alone skips the |x| sums; its Hessian is unchanged, and a non-finite input still fails ``finite``."""
    torch.manual_seed(1)
    x = torch.randn(4, 32, 8)
    full, lean = InputStats(8), InputStats(8, want_abs=False)
    for batch in x:
        full.update(batch)
        lean.update(batch)
    assert torch.equal(full.xtx, lean.xtx) and lean.count == full.count
    assert not lean.abs_sum.any() and not lean.abs_max.any()
    bad = x[0].clone()
    bad[3, 2] = float("inf")
    lean.update(bad)
    assert not lean.finite()
