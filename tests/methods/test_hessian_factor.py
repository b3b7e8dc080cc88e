"""The upper Cholesky factor of H^-1 by one reversed factorization and a blocked triangular inverse."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.methods.hessian_factor import (LEAF, damped_upper_inverse_cholesky, lower_triangular_inverse,
                                          upper_inverse_cholesky)


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


def test_damped_factor_first_try_is_the_plain_damped_factor():
    h = _spd(64, 3)
    damp = 0.01
    expected = upper_inverse_cholesky(h + torch.eye(64, dtype=h.dtype) * damp * h.diagonal().mean())
    assert torch.equal(damped_upper_inverse_cholesky(h, damp, "layer"), expected)


def test_damped_factor_raises_dampening_for_a_semidefinite_hessian():
    torch.manual_seed(0)
    x = torch.randn(4, 32, dtype=torch.float64)  # 4 samples, 32 features: rank 4
    v = torch.randn(32, dtype=torch.float64)
    v -= torch.linalg.pinv(x) @ (x @ v)  # a direction no sample has
    v /= v.norm()
    h = x.T @ x
    h -= 0.05 * h.diagonal().mean() * torch.outer(v, v)  # eigenvalue -0.05 mean(diag): 1% too little, 10% enough
    eye = torch.eye(32, dtype=h.dtype)
    with pytest.raises(torch.linalg.LinAlgError):
        upper_inverse_cholesky(h + eye * 0.01 * h.diagonal().mean())
    u = damped_upper_inverse_cholesky(h, 0.01, "layer")
    assert torch.allclose(u.T @ u, torch.linalg.inv(h + eye * 0.1 * h.diagonal().mean()), rtol=1e-6, atol=1e-8)


def test_damped_factor_gives_up_with_a_named_one_line_error():
    h = -torch.eye(8, dtype=torch.float64)
    with pytest.raises(LowbitError, match="^q_proj: the input Hessian is not positive definite"):
        damped_upper_inverse_cholesky(h, 0.01, "q_proj")
