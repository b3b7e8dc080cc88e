"""The upper Cholesky factor of H^-1 by one reversed factorization and a blocked triangular inverse."""

from __future__ import annotations

import pytest
import torch

from lowbit.methods.hessian_factor import LEAF, lower_triangular_inverse, upper_inverse_cholesky


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n + 8, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)
    return x.T @ x / x.shape[0] + 1e-3 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 7, LEAF, LEAF + 1, 3 * LEAF + 17])
def test_equals_the_three_step_factor(n):
    h = _spd(n, n)
    u = upper_inverse_cholesky(h)
    textbook = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    assert torch.equal(u, u.triu()) and bool((u.diagonal() > 0).all())
    assert torch.allclose(u, textbook, rtol=1e-9, atol=1e-12)
    assert torch.allclose(u.T @ u, torch.linalg.inv(h), rtol=1e-8, atol=1e-10)


def test_triangular_inverse_in_float32():
    lower = torch.linalg.cholesky(_spd(300, 1)).float()
    inverse = lower_triangular_inverse(lower)
    assert torch.equal(inverse, inverse.tril())
    assert torch.allclose(inverse @ lower, torch.eye(300), atol=1e-4)


def test_not_positive_definite_raises():
    h = _spd(20, 2)
    h[5, 5] = -1.0
    with pytest.raises(torch.linalg.LinAlgError):
        upper_inverse_cholesky(h)
